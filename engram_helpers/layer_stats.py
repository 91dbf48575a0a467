"""Key statistics for ROME: C = E[k kᵀ], the second moment of an MLP output projection's inputs.

ROME whitens its update by C⁻¹ so that keys the layer often sees are disturbed as little as possible.
:func:`second_moments` estimates C for any set of layers in **one** pass over the text: the forward pass
stops after the last layer needed (``trace_many(..., stop=True)``), every result is cached on disk
(:func:`engram_helpers.models.cache_file`), and the time it took is printed. A layer sweep therefore pays
for C once, not once per layer::

    Cs = second_moments(model, tok, range(0, 30, 2))   # {layer: SecondMoment}
    Cs[4].C                                              # [d_mlp, d_mlp]

The default text is BBC News articles that ship inside a PyPI package (:func:`engram_helpers.textdata.load_bbc`);
the paper used 100,000 Wikipedia samples.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .hooks import trace_many
from .models import arch, cache_file, encode, mlp_out_weight, sample_text

SOURCES = ("bbc", "generated", "wikitext")
"""Where the text for C comes from: shipped BBC News text (offline), text the model writes itself (slow),
or the Hub dataset WikiText-103 (needs the ``datasets`` package and network, e.g. on Colab)."""


@dataclass
class SecondMoment:
    """C = E[k kᵀ] of the MLP output projection's inputs at one layer.

    ``C``: [d_mlp, d_mlp] (float32, exactly symmetric); ``n_tokens``: how many token positions it averages;
    ``source``: the text it came from.
    """

    C: torch.Tensor
    layer: int
    n_tokens: int
    source: str

    def cond(self) -> float:
        """Condition number of C (largest over smallest eigenvalue)."""
        ev = torch.linalg.eigvalsh(self.C.double())
        return float(ev[-1] / ev[0])

    def is_spd(self) -> bool:
        """Whether C is symmetric and positive definite (a Cholesky factorization exists)."""
        sym = torch.equal(self.C, self.C.T)
        return sym and torch.linalg.cholesky_ex(self.C.double()).info.item() == 0


_STARTS = ("The", "Therefore", "Because", "I", "You")


def texts(source: str, model: nn.Module, tok, seed: int = 0) -> Iterator[str]:
    """The texts of ``source`` (see :data:`SOURCES`), in a seeded order."""
    if source == "bbc":
        from .textdata import load_bbc

        articles = list(load_bbc(max_chars=None).texts)
        random.Random(seed).shuffle(articles)
        yield from articles
    elif source == "generated":
        gen = torch.Generator().manual_seed(seed)
        i = 0
        while True:
            start = _STARTS[i % len(_STARTS)]
            yield start + sample_text(model, tok, start, 127, top_k=20, generator=gen)
            i += 1
    elif source == "wikitext":
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-103-raw-v1", split="train").shuffle(seed=seed)
        for row in ds:
            if len(row["text"]) > 200:
                yield row["text"]
    else:
        raise ValueError(f"Unknown source {source!r}: use one of {SOURCES} ('bbc' is offline and shipped; "
                         f"'generated' is text the model writes, slow; 'wikitext' needs the Hub).")


def _path(model: nn.Module, layer: int, source: str, n_tokens: int, seq_len: int, seed: int):
    return cache_file(model, "layer_stats", f"{source}-{n_tokens}-len{seq_len}-seed{seed}-layer{layer}.pt")


@torch.no_grad()
def second_moments(model: nn.Module, tok, layers: Sequence[int], n_tokens: int = 20_000, source: str = "bbc",
                   seq_len: int = 128, batch_size: int = 8, seed: int = 0,
                   verbose: bool = True) -> dict[int, SecondMoment]:
    """C = E[k kᵀ] at several layers from one pass over ``n_tokens`` tokens of text: ``{layer: SecondMoment}``.

    Each text's first ``seq_len`` tokens (after the encode prefix) are used; the prefix token itself is not
    counted. The forward pass stops after the highest requested layer. Results are cached per (model,
    layer, source, n_tokens, seq_len, seed); only layers not yet cached are computed, and the time is printed.
    """
    a = arch(model)
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise ValueError("No layers given: pass e.g. [4] or range(0, n_layers, 2).")
    for l in layers:
        a.mlp_out_name(l)  # a clear error for a layer that does not exist
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    if source not in SOURCES:
        raise ValueError(f"Unknown source {source!r}: use one of {SOURCES}.")
    start = time.perf_counter()
    result: dict[int, SecondMoment] = {}
    todo = []
    for l in layers:
        path = _path(model, l, source, n_tokens, seq_len, seed)
        if path.exists():
            saved = torch.load(path, weights_only=True)
            result[l] = SecondMoment(saved["C"], l, int(saved["n_tokens"]), source)
        else:
            todo.append(l)
    if todo:
        result.update(_estimate(model, tok, todo, n_tokens, source, seq_len, batch_size, seed))
    if verbose:
        cached = [l for l in layers if l not in todo]
        print(f"C for layers {layers} ({n_tokens:,} tokens of {source!r} text): computed {todo or 'none'} in one pass, "
              f"loaded {cached or 'none'} from the cache; {time.perf_counter() - start:.1f} s")
    return dict(sorted(result.items()))


def _estimate(model, tok, todo: list[int], n_tokens: int, source: str, seq_len: int, batch_size: int,
              seed: int) -> dict[int, SecondMoment]:
    a = arch(model)
    device = next(model.parameters()).device
    d = mlp_out_weight(model, todo[0]).shape[1]
    sums = {l: torch.zeros(d, d, device=device) for l in todo}
    names = [a.mlp_out_name(l) for l in todo]
    count = 0
    stream = texts(source, model, tok, seed)
    while count < n_tokens:
        chunk = [t for _, t in zip(range(batch_size), stream)]
        if not chunk:
            raise ValueError(f"The source {source!r} ran out of text after {count} tokens: ask for fewer tokens.")
        batch, _ = encode(tok, chunk, device)
        batch = {k: v[:, :seq_len + 1] for k, v in batch.items()}
        valid = batch["attention_mask"].bool().clone()
        valid[:, 0] = False  # skip the encode prefix token: its activations are not typical keys
        keep = valid.flatten().nonzero()[:, 0][: n_tokens - count]  # exactly n_tokens positions in all
        with trace_many(model, names, retain_output=False, retain_input=True, stop=True) as tr:
            model(**batch)
        for l, n in zip(todo, names):
            x_in = tr[n].input
            assert x_in is not None  # retain_input=True and the forward pass ran
            x = x_in.reshape(-1, d)[keep].float()
            sums[l].addmm_(x.T, x)
        count += len(keep)
    out = {}
    for l in todo:
        C = (sums[l] / count).float().cpu()
        C = (C + C.T) / 2  # exactly symmetric
        path = _path(model, l, source, n_tokens, seq_len, seed)
        tmp = path.with_suffix(".tmp")
        torch.save({"C": C, "n_tokens": count}, tmp)
        tmp.replace(path)
        out[l] = SecondMoment(C, l, count, source)
    return out


def second_moment(model: nn.Module, tok, layer: int, n_tokens: int = 20_000, source: str = "bbc",
                  **kwargs) -> SecondMoment:
    """C at one layer (see :func:`second_moments`, which caches it)."""
    return second_moments(model, tok, [layer], n_tokens, source, **kwargs)[layer]

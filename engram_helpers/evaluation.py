"""Score edits the way CounterFact does (Meng et al. 2022), with baselines and intervals.

For one edit request (subject, relation, true object o_true → new object o_new) the scores are:

- **efficacy** (ES): on the edited prompt, is the new object more probable than the true one?
- **paraphrase** (PS): the same on paraphrases of the prompt (generalization);
- **neighbourhood** (NS): on prompts about *other* subjects with the same true object, is the true object
  still more probable (specificity)?

and the paper's magnitudes: EM = P(new) − P(true) on the edited prompt, PM the same on paraphrases, NM =
P(true) − P(new) on neighbourhood prompts. As in the authors' code (``experiments/summarize.py``), the
probability of an answer of several tokens is exp(−mean token NLL), each score is averaged over one
fact's prompts and then over facts. :func:`evaluate` reports every score for the unedited model beside the
edited one, each with a seeded bootstrap 95% interval over facts. Reading the committed layer sweeps (which
layer to edit, and the rule a check follows) is :mod:`engram_helpers.sweeps`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import data, weights
from .layer_stats import SecondMoment
from .models import _answer_logits, answer_ids, generate
from .rome import (
    HParams,
    _as_C,
    _prefixes,
    compute_key,
    compute_value,
    hparams_for,
    rank_one_update,
    weight_delta,
    with_settings,
)
from .stats import Estimate, bootstrap

WIN_RATES = ("efficacy", "paraphrase", "neighbourhood")
MAGNITUDES = ("efficacy_mag", "paraphrase_mag", "neighbourhood_mag")
METRICS = WIN_RATES + MAGNITUDES


def _score_and_next(model: nn.Module, tok, fact: data.Fact) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`score_edit`'s scores and the next-token distribution after each neighbourhood prompt
    ([n_neighbourhood, vocab]), from ONE batched forward pass over the fact's prompts followed by each
    answer (the prompt's last position does not see the appended answer)."""
    prompts = [fact.prompt, *fact.paraphrases, *fact.neighbourhood]
    n = len(prompts)
    answers = [answer_ids(tok, fact.target_new)] * n + [answer_ids(tok, fact.target_true)] * n
    with torch.no_grad():
        per_row = _answer_logits(model, tok, prompts * 2, answers)  # [len(answer), vocab] per prompt
    probs = np.array([float(torch.log_softmax(lg, -1)[torch.arange(len(a)), a].mean().exp())
                      for lg, a in zip(per_row, answers)])
    p_new, p_true = probs[:n], probs[n:]
    n_para = len(fact.paraphrases)
    first = 1 + n_para
    # after each neighbourhood prompt (its first answer position does not see the appended answer)
    nxt_logits = [per_row[r][0] for r in range(first, n)]
    vocab = per_row[0].shape[-1]
    nxt = torch.softmax(torch.stack(nxt_logits), -1).cpu() if nxt_logits else torch.empty(0, vocab)
    parts = {"efficacy": slice(0, 1), "paraphrase": slice(1, first), "neighbourhood": slice(first, None)}
    out: dict[str, float] = {}
    for name, sl in parts.items():
        gain = p_new[sl] - p_true[sl] if name != "neighbourhood" else p_true[sl] - p_new[sl]
        out[name] = float(np.mean(gain > 0)) if len(gain) else float("nan")
        out[name + "_mag"] = float(np.mean(gain)) if len(gain) else float("nan")
    return out, nxt


def score_edit(model: nn.Module, tok, fact: data.Fact) -> dict[str, float]:
    """The model's current scores on one fact: the three win rates (fractions of the fact's prompts) and the
    three magnitudes (mean probability differences), keys :data:`METRICS`. One forward pass."""
    return _score_and_next(model, tok, fact)[0]


def mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of KL(p ‖ q) in nats, for probability rows p, q: [n, vocab]."""
    p, q = p.double().clamp_min(1e-30), q.double().clamp_min(1e-30)
    return float((p * (p.log() - q.log())).sum(-1).mean())


@dataclass
class Evaluation:
    """Per-fact rows of :func:`evaluate` and their summaries.

    ``rows``: one dict per (fact, method), methods ``"unedited"`` (before any edit), ``"rome"`` and/or
    ``"identity"``, with the :data:`METRICS`, ``neighbourhood_kl`` (mean KL, nats, of the next-token
    distribution on the neighbourhood prompts, unedited ‖ edited), the optimization's ``steps`` and the
    ``seconds`` for k* and v*.
    """

    rows: list[dict]
    seed: int = 0

    @property
    def methods(self) -> list[str]:
        """The methods in the rows, ``"unedited"`` first."""
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def values(self, method: str, metric: str) -> np.ndarray:
        """One value per fact of ``metric`` for ``method``: [n_facts]."""
        return np.array([r[metric] for r in self.rows if r["method"] == method], dtype=float)

    def fact_ids(self, method: str) -> list[int]:
        """The ids of the facts ``method`` has rows for, in order."""
        return [r["fact"] for r in self.rows if r["method"] == method]

    def paired(self, metric: str, method: str = "rome", minus: str | Evaluation = "unedited") -> np.ndarray:
        """Each fact's ``metric`` for ``method`` minus the same fact's for ``minus``: another method of this
        evaluation (default: the unedited model, so the change an edit made), or another evaluation of the same
        facts (its rows for ``method``): [n_facts]. Average it with :func:`bootstrap` for a paired interval."""
        other, other_method = (self, minus) if isinstance(minus, str) else (minus, method)
        for ev, m in ((self, method), (other, other_method)):
            if m not in ev.methods:
                raise ValueError(f"No rows for method {m!r}: that evaluation has {ev.methods}.")
        if self.fact_ids(method) != other.fact_ids(other_method):
            raise ValueError("The two sets of rows are not the same facts in the same order: a paired difference "
                             "needs both evaluated on one list of facts.")
        return self.values(method, metric) - other.values(other_method, metric)

    def estimate(self, method: str, metric: str) -> Estimate:
        """Mean over facts with a seeded bootstrap 95% interval."""
        if method not in self.methods:
            raise ValueError(f"No rows for method {method!r}: this evaluation has {self.methods}.")
        return bootstrap(self.values(method, metric), seed=self.seed)

    def table(self, metrics: Sequence[str] = METRICS) -> str:
        """Every method's scores as aligned text, means with [95% interval]."""
        lines = [f"{'method':<10}" + "".join(f"{m:>24}" for m in metrics)]
        for meth in self.methods:
            lines.append(f"{meth:<10}" + "".join(f"{str(self.estimate(meth, m)):>24}" for m in metrics))
        return "\n".join(lines)


def evaluate(model: nn.Module, tok, facts: Sequence[data.Fact], hparams: HParams | None = None,
             C: SecondMoment | torch.Tensor | str | None = None, methods: Sequence[str] = ("rome",),
             generate_tokens: int = 0, unedited: bool = True, seed: int = 0, verbose: bool = False) -> Evaluation:
    """Edit each fact toward its ``target_new`` one at a time, score, and undo; score the unedited model too.

    ``hparams``: default :func:`~engram_helpers.rome.hparams_for` (the layer is ``hparams.layer``).
    ``methods``: ``"rome"`` (C⁻¹-whitened update) and/or ``"identity"`` (C replaced by the identity). Both use
    the same k* and v*, computed once per fact. ``generate_tokens`` > 0 adds a greedy continuation of the
    edited prompt to each row. ``unedited=False`` skips the unedited model's rows (e.g. in a layer sweep,
    where they do not change). ``seed`` seeds the bootstrap.
    """
    if not facts:
        raise ValueError("No facts to evaluate: pass a non-empty list, e.g. data.known_facts(model, tok)[:20].")
    bad = [m for m in methods if m not in ("rome", "identity")]
    if bad:
        raise ValueError(f"Unknown methods {bad}: use 'rome' and/or 'identity'.")
    hp = hparams or hparams_for(model)
    layer = hp.layer
    Cm = _as_C(model, tok, layer, C, hp) if "rome" in methods else None
    prefixes = _prefixes(model, tok, hp, None)
    from .models import mlp_out_weight

    W = mlp_out_weight(model, layer)
    rows: list[dict] = []
    for i, f in enumerate(facts):
        base = {"fact": f.id, "subject": f.subject, "target_new": f.target_new, "layer": layer}
        s0, before = _score_and_next(model, tok, f)
        if unedited:
            rows.append({**base, "method": "unedited", **s0, "neighbourhood_kl": 0.0})
        t0 = time.perf_counter()
        q = f.query(f.target_new)
        key = compute_key(model, tok, q, layer, prefixes)
        val = compute_value(model, tok, q, key, hp, prefixes)
        t_kv = time.perf_counter() - t0
        for m in methods:
            dW = rank_one_update(W, key, val.v, Cm if m == "rome" else None)
            with weights.add(model, weight_delta(model, layer, dW), label=m):
                s, after = _score_and_next(model, tok, f)
                kl = mean_kl(before, after) if len(after) else 0.0
                text = generate(model, tok, f.prompt, generate_tokens) if generate_tokens else ""
            rows.append({**base, "method": m, **s, "neighbourhood_kl": kl, "p_new_opt": val.p_new,
                         "steps": len(val.losses), "seconds": t_kv, "generation": text})
        if verbose:
            print(f"[{i + 1}/{len(facts)}] {f.subject!r} -> {f.target_new!r}: {len(val.losses)} steps, {t_kv:.1f} s")
    return Evaluation(rows, seed)


def evaluate_layers(model: nn.Module, tok, facts: Sequence[data.Fact], layers: Sequence[int], hparams: HParams,
                    Cs: dict[int, SecondMoment] | dict[int, str]) -> dict[int, Evaluation]:
    """Edit every fact at every layer in ``layers`` (one edit at a time, each undone): ``{layer: Evaluation}``.

    ``hparams``: the settings, whose layer is replaced by each of ``layers``; ``Cs[layer]``: that layer's C
    (a :class:`~engram_helpers.layer_stats.SecondMoment`, or ``"identity"``). Only the ``"rome"`` rows (no
    unedited rows: they do not depend on the layer).
    """
    missing = [l for l in layers if l not in Cs]
    if missing:
        raise ValueError(f"No C for layers {missing}: pass layer_stats.second_moments(model, tok, {list(layers)}).")
    return {l: evaluate(model, tok, facts, hparams=with_settings(hparams, layer=l), C=Cs[l], unedited=False)
            for l in layers}

def committed_result(name: str) -> dict | None:
    """``benchmarks/results/<name>`` (a JSON result committed in the course repository), read from the clone the
    notebook runs in (looked for from the working directory upwards), or None outside a clone (e.g. on Colab or
    after a pip install): notebooks then say where the file is instead of failing."""
    rel = Path("benchmarks", "results", name)
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / rel).is_file():
            return json.loads((folder / rel).read_text(encoding="utf-8"))
    return None

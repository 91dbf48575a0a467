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
edited one, each with a seeded bootstrap 95% interval over facts.
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


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` facts with its bootstrap 95% interval ``[lo, hi]``."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"

    def pct(self) -> str:
        """As percentages: ``"95% [88, 100]"``."""
        return f"{100 * self.mean:.0f}% [{100 * self.lo:.0f}, {100 * self.hi:.0f}]"


def bootstrap(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of ``values`` (one per fact) with a seeded percentile bootstrap 95% interval over facts."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        raise ValueError("No values to average: evaluate at least one fact.")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return Estimate(float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)), len(x))


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


def sweep_matrices(sweep: dict, outcome: str = "paraphrase_mag") -> tuple[np.ndarray, np.ndarray]:
    """From a layer sweep's record (``rome.layer_sweep``, written by ``scripts/rome_sweep.py``): each fact's
    ``outcome`` (a score of :data:`METRICS`) after an edit at each swept layer, and its tracing effect there,
    both [facts, layers] in the order of ``sweep["layers"]``: the ``Y`` and ``E`` of
    :func:`tracing_predicts_editing`."""
    if outcome not in METRICS:
        raise ValueError(f"Unknown outcome {outcome!r}: use one of {list(METRICS)}.")
    Y = np.array([sweep["per_layer"][str(layer)][outcome] for layer in sweep["layers"]], dtype=float).T
    return Y, np.array(sweep["tracing_effect"], dtype=float)


def sweep_estimates(sweep: dict, metrics: Sequence[str] = METRICS) -> dict[int, dict[str, Estimate]]:
    """Per swept layer of a layer sweep's record (``rome.layer_sweep``), each score of ``metrics`` averaged
    over the facts with a bootstrap 95% interval: ``{layer: {metric: Estimate}}``."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown scores {unknown}: use those of {list(METRICS)}.")
    return {l: {m: bootstrap(sweep["per_layer"][str(l)][m]) for m in metrics} for l in sweep["layers"]}


def fact_totals(sweep: dict) -> dict[int, np.ndarray]:
    """Per swept layer of a layer sweep's record (``rome.layer_sweep``): each fact's three magnitudes summed,
    [facts] in the record's order (what the sweep ranks layers by)."""
    return {l: np.sum([sweep["per_layer"][str(l)][m] for m in MAGNITUDES], axis=0) for l in sweep["layers"]}


def sweep_totals(sweep: dict) -> tuple[dict[int, Estimate], list[int]]:
    """How a layer sweep's record chose: per swept layer, ``fact_totals`` averaged over the facts with a
    bootstrap 95% interval (the sweep keeps the layer with the largest mean), and the layers whose mean lies
    within the best layer's interval (as good as the best, at this many facts)."""
    totals = {l: bootstrap(v) for l, v in fact_totals(sweep).items()}
    best = max(totals, key=lambda l: totals[l].mean)
    return totals, [l for l in totals if totals[l].mean >= totals[best].lo]


def sweep_differences(sweep: dict, reference: int, metric: str | None = None) -> dict[int, Estimate]:
    """Per swept layer, each fact's ``fact_totals`` (or, with ``metric``, that one score of :data:`METRICS`)
    minus the same fact's at layer ``reference``, averaged with a bootstrap 95% interval over facts: a paired
    comparison, which tells layers apart better than comparing their separate intervals (a layer beats
    ``reference`` where the interval lies above zero)."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"Unknown score {metric!r}: use one of {list(METRICS)}, or None for the summed magnitudes.")
    per_fact = (fact_totals(sweep) if metric is None
                else {l: np.asarray(sweep["per_layer"][str(l)][metric], dtype=float) for l in sweep["layers"]})
    if reference not in per_fact:
        raise ValueError(f"layer {reference} was not swept: choose one of {sweep['layers']}.")
    return {l: bootstrap(v - per_fact[reference]) for l, v in per_fact.items()}


def layer_rule(sweep: dict, reference: int) -> tuple[int, dict[int, Estimate]]:
    """The rule fixed before a check sweep on fresh facts runs: its best layer replaces the layer in use
    (``reference``) only if it beats it fact by fact, with the paired 95% interval of
    :func:`sweep_differences` above zero; otherwise ``reference`` stays. Returns the layer the rule keeps and
    every swept layer's paired difference from ``reference``."""
    diffs = sweep_differences(sweep, reference)
    best = sweep["best_layer"]
    return (best if best != reference and diffs[best].lo > 0 else reference), diffs


def chosen_layer(sweep: dict) -> int:
    """The layer a committed sweep decides: its best layer, or, for a check run under a rule fixed before it
    ran (``sweep["settings"]["rule_reference"]``: the layer then in use), :func:`layer_rule`'s outcome."""
    reference = sweep["settings"].get("rule_reference")
    return sweep["best_layer"] if reference is None else layer_rule(sweep, reference)[0]


@dataclass(frozen=True)
class RuleCheck:
    """A check sweep read under the rule fixed before it ran (:func:`rule_check`). Layers are those swept."""

    reference: int  # the layer in use when the check ran
    best: int  # the layer with the largest mean of the summed magnitudes
    kept: int  # the layer the rule keeps (:func:`layer_rule`)
    totals: dict[int, Estimate]  # per layer, the summed magnitudes (:func:`sweep_totals`)
    differences: dict[int, Estimate]  # per layer, its summed magnitudes minus the reference's, fact by fact
    magnitudes: dict[int, dict[str, Estimate]]  # per layer, each of the three magnitudes
    deeper: list[int]  # the layers above both the reference and the best layer
    deeper_differences: dict[int, dict[str, Estimate]]  # per deeper layer and magnitude, minus the reference's
    n_facts: int
    n_relations: int

    def report(self) -> str:
        """Every layer's numbers, the rule's outcome, and each deeper layer against the reference, as text."""
        lines = [f"  layer {l}: sum {self.totals[l]}, minus layer {self.reference} fact by fact "
                 f"{self.differences[l]}; " + ", ".join(f"{m} {e}" for m, e in self.magnitudes[l].items())
                 for l in self.magnitudes]
        verb = "keeps" if self.kept == self.reference else "moves to"
        lines.append(f"  best layer {self.best}; the rule {verb} layer {self.kept}")
        lines += [f"  layer {l} minus layer {self.reference} fact by fact: "
                  + ", ".join(f"{m} {e}" for m, e in d.items()) for l, d in self.deeper_differences.items()]
        return "\n".join(lines)


def rule_check(sweep: dict) -> RuleCheck:
    """Read a check sweep run under a rule fixed before it ran (its record's ``settings.rule_reference``, the
    layer then in use; ``scripts/rome_sweep.py --rule-reference``): the rule's outcome, every layer's scores, and
    the layers deeper than both the reference and the best, compared with the reference score by score."""
    reference = sweep["settings"].get("rule_reference")
    if reference is None:
        raise ValueError("This sweep ran without a rule (no settings.rule_reference): read it with sweep_totals.")
    kept, differences = layer_rule(sweep, reference)
    deeper = [l for l in sweep["layers"] if l > max(reference, sweep["best_layer"])]
    per_score = {m: sweep_differences(sweep, reference, metric=m) for m in MAGNITUDES}
    return RuleCheck(reference=reference, best=sweep["best_layer"], kept=kept, totals=sweep_totals(sweep)[0],
                     differences=differences, magnitudes=sweep_estimates(sweep, MAGNITUDES), deeper=deeper,
                     deeper_differences={l: {m: per_score[m][l] for m in MAGNITUDES} for l in deeper},
                     n_facts=len(sweep["fact_ids"]), n_relations=len({f.relation for f in sweep_facts(sweep)}))


def committed_result(name: str) -> dict | None:
    """``benchmarks/results/<name>`` (a JSON result committed in the course repository), read from the clone the
    notebook runs in (looked for from the working directory upwards), or None outside a clone (e.g. on Colab or
    after a pip install): notebooks then say where the file is instead of failing."""
    rel = Path("benchmarks", "results", name)
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / rel).is_file():
            return json.loads((folder / rel).read_text(encoding="utf-8"))
    return None


def recorded_fact_ids(paths: Sequence[str | Path]) -> set[int]:
    """The ids of the facts that committed records used (JSON files with ``"fact_ids"``: a layer sweep's, a
    settings comparison's), so that a new check can leave them out and run on fresh facts."""
    ids: set[int] = set()
    for path in paths:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if "fact_ids" not in record:
            raise ValueError(f"{path} has no 'fact_ids': pass a sweep or settings record (JSON) to leave out.")
        ids.update(record["fact_ids"])
    return ids


def sweep_facts(sweep: dict) -> list[data.Fact]:
    """The facts a layer sweep's record edited, in its order (e.g. to count their relations)."""
    by_id = {f.id: f for f in data.facts_in_split(sweep["split"])}
    return [by_id[i] for i in sweep["fact_ids"]]


def tracing_predicts_editing(Y: np.ndarray, E: np.ndarray, n_boot: int = 1000, n_perm: int = 2000,
                             seed: int = 0) -> dict[str, float | list[float]]:
    """Hase et al. (2023)'s question: does the tracing effect predict an edit's success beyond the layer?

    ``Y``, ``E``: [facts, layers] an edit's success and the fact's tracing effect at each edited layer. Fits
    success on the layer alone (one indicator per layer) and on the layer plus the tracing effect; returns
    ``r2_layer``, ``r2_both``, ``gain`` (their difference), ``slope`` (the tracing effect's coefficient in the
    second fit: its sign says which way success moves with the effect at a given layer) and ``r`` (Pearson
    correlation of effect and success, layers pooled), each with a ``*_ci`` seeded bootstrap 95% interval over
    facts (a resampled fact brings all its layers). An in-sample gain in R² is never negative, so its interval
    cannot show that the gain is more than chance: ``gain_p`` does, the share of ``n_perm`` seeded permutations
    of the facts' tracing effects (each fact's row of ``E`` given to another fact) whose gain is at least the
    observed one (counting the observed one).
    """
    Y, E = np.asarray(Y, dtype=float), np.asarray(E, dtype=float)
    if Y.shape != E.shape or Y.ndim != 2 or Y.shape[0] < 2:
        raise ValueError(f"Y and E must both be [facts, layers] with at least 2 facts; got {Y.shape} and {E.shape}.")
    n_f, n_l = Y.shape

    def fit(Y: np.ndarray, E: np.ndarray) -> tuple[float, float, float, float]:
        y, e = Y.ravel(), E.ravel()
        X_layer = np.tile(np.eye(n_l), (len(Y), 1))

        def r2(X: np.ndarray) -> tuple[float, float]:
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            return float(1 - np.sum((y - X @ coef) ** 2) / np.sum((y - y.mean()) ** 2)), float(coef[-1])

        (r2_layer, _), (r2_both, slope) = r2(X_layer), r2(np.column_stack([X_layer, e]))
        return r2_layer, r2_both, slope, float(np.corrcoef(e, y)[0, 1])

    point = fit(Y, E)
    rng = np.random.default_rng(seed)
    boot = np.array([fit(Y[idx], E[idx]) for idx in (rng.integers(0, n_f, n_f) for _ in range(n_boot))])
    perm = np.array([fit(Y, E[rng.permutation(n_f)]) for _ in range(n_perm)])
    gain, perm_gain = point[1] - point[0], perm[:, 1] - perm[:, 0]

    def ci(x: np.ndarray) -> list[float]:
        return [float(np.nanpercentile(x, 2.5)), float(np.nanpercentile(x, 97.5))]

    return {"r2_layer": point[0], "r2_layer_ci": ci(boot[:, 0]), "r2_both": point[1], "r2_both_ci": ci(boot[:, 1]),
            "gain": gain, "gain_ci": ci(boot[:, 1] - boot[:, 0]),
            "gain_p": float((1 + np.sum(perm_gain >= gain - 1e-12)) / (1 + n_perm)),
            "slope": point[2], "slope_ci": ci(boot[:, 2]), "r": point[3], "r_ci": ci(boot[:, 3])}

"""Where to edit: the committed layer sweeps, read.

``scripts/rome_sweep.py`` edits development facts at several layers and writes a record
(``hparams/sweeps/<model id>[-variant].json``: the layers, the facts' ids, every fact's scores at every layer, their
tracing effects, the best layer). A model's settings file names the sweep that chose its layer
(:func:`choosing_sweep`); a check run under a rule fixed before it ran keeps the layer then in use unless another
beats it fact by fact (:func:`layer_rule`, :func:`rule_check`). :func:`tracing_predicts_editing` asks Hase et al.
(2023)'s question of a sweep: does a fact's tracing effect at a layer predict how well an edit there does?

    sweep = sweeps.choosing_sweep(model)        # the record that chose the model's layer
    sweeps.chosen_layer(sweep)                  # == rome.hparams_for(model).layer
    print(sweeps.rule_check(sweep).report())    # for a check under a rule: every layer against the one in use
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from . import data
from .evaluation import MAGNITUDES, METRICS
from .models import model_id
from .rome import _spec_for
from .stats import Estimate, bootstrap


def layer_sweep(model: nn.Module, variant: str = "") -> dict | None:
    """The committed result of ``scripts/rome_sweep.py`` for ``model`` (``hparams/sweeps/<model id>.json``:
    layers, development-split fact ids, per-layer scores, tracing effects, ``best_layer``), or None.
    ``variant``: a check committed beside it, where there is one: ``"spread"`` (rerun with ``--spread``, facts
    spread over relations), ``"fresh"`` (the early layers again, on development facts new to both),
    ``"clamp2"`` (Gemma: the early layers again with a clamp factor of 2, chosen together with it)."""
    name = f"{model_id(model)}-{variant}.json" if variant else f"{model_id(model)}.json"
    path = resources.files("engram_helpers").joinpath("hparams", "sweeps", name)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def choosing_sweep(model: nn.Module) -> dict | None:
    """The committed sweep that decided ``model``'s tuned layer (its settings file names the variant:
    ``"layer_chosen_by"``; the layer is :func:`chosen_layer` of it), or None for a model without one
    (GPT-2 XL's layer is the paper's)."""
    spec = _spec_for(model)
    if spec is None or spec["status"] != "tuned":
        return None
    return layer_sweep(model, variant=spec.get("layer_chosen_by", ""))


def sweep_matrices(sweep: dict, outcome: str = "paraphrase_mag") -> tuple[np.ndarray, np.ndarray]:
    """From a layer sweep's record (:func:`layer_sweep`, written by ``scripts/rome_sweep.py``): each fact's
    ``outcome`` (a score of :data:`METRICS`) after an edit at each swept layer, and its tracing effect there,
    both [facts, layers] in the order of ``sweep["layers"]``: the ``Y`` and ``E`` of
    :func:`tracing_predicts_editing`."""
    if outcome not in METRICS:
        raise ValueError(f"Unknown outcome {outcome!r}: use one of {list(METRICS)}.")
    Y = np.array([sweep["per_layer"][str(layer)][outcome] for layer in sweep["layers"]], dtype=float).T
    return Y, np.array(sweep["tracing_effect"], dtype=float)


def sweep_estimates(sweep: dict, metrics: Sequence[str] = METRICS) -> dict[int, dict[str, Estimate]]:
    """Per swept layer of a layer sweep's record (:func:`layer_sweep`), each score of ``metrics`` averaged
    over the facts with a bootstrap 95% interval: ``{layer: {metric: Estimate}}``."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown scores {unknown}: use those of {list(METRICS)}.")
    return {l: {m: bootstrap(sweep["per_layer"][str(l)][m]) for m in metrics} for l in sweep["layers"]}


def fact_totals(sweep: dict) -> dict[int, np.ndarray]:
    """Per swept layer of a layer sweep's record (:func:`layer_sweep`): each fact's three magnitudes summed,
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
    close: list[int]  # the layers whose mean sum lies within the best layer's interval (:func:`sweep_totals`)
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
    totals, close = sweep_totals(sweep)
    return RuleCheck(reference=reference, best=sweep["best_layer"], kept=kept, totals=totals, close=close,
                     differences=differences, magnitudes=sweep_estimates(sweep, MAGNITUDES), deeper=deeper,
                     deeper_differences={l: {m: per_score[m][l] for m in MAGNITUDES} for l in deeper},
                     n_facts=len(sweep["fact_ids"]), n_relations=len(data.relations(sweep_facts(sweep))))


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

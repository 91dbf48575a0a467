"""The large ROME layer sweep and the Hase et al. (2023) analysis (the notebook runs a small version).

    PYTHONPATH=. flock /tmp/engram-heavy.lock \
        python scripts/rome_sweep.py [--step 2] [--facts 10] [--out rome_sweep.json]

Every ``--step``-th layer, ``--facts`` known facts of the TEST split, each edited at each layer (2 context
prefixes, as in the notebook's sweep) and scored with the CounterFact magnitudes; the MLP causal trace of
each fact (window 10, 5 noise samples); then, per (fact, layer), the R² of the paraphrase magnitude on
the layer alone (one indicator per layer) and on the layer plus the fact's tracing effect at that layer,
and the correlation of tracing effect and success, with bootstrap 95% intervals over facts (1,000
resamples, seed 0). Prints a table and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from engram_helpers import data, evaluation, layer_stats, rome, tracing
from engram_helpers.models import load_model


def hase(Y: np.ndarray, E: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Y, E: [facts, layers] edit success and tracing effect. R² of layer only / layer + effect, and r."""
    n_f, n_l = Y.shape

    def fit(Y, E):
        y, e = Y.ravel(), E.ravel()
        X_layer = np.tile(np.eye(n_l), (len(Y), 1))
        X_both = np.column_stack([X_layer, e])

        def r2(X):
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            return 1 - np.sum((y - X @ coef) ** 2) / np.sum((y - y.mean()) ** 2)

        return r2(X_layer), r2(X_both), float(np.corrcoef(e, y)[0, 1])

    point = fit(Y, E)
    rng = np.random.default_rng(seed)
    boot = np.array([fit(Y[idx], E[idx]) for idx in (rng.integers(0, n_f, n_f) for _ in range(n_boot))])
    gain = boot[:, 1] - boot[:, 0]
    ci = lambda x: [float(np.nanpercentile(x, 2.5)), float(np.nanpercentile(x, 97.5))]
    return {"r2_layer": point[0], "r2_layer_ci": ci(boot[:, 0]), "r2_both": point[1], "r2_both_ci": ci(boot[:, 1]),
            "gain": point[1] - point[0], "gain_ci": ci(gain), "r": point[2], "r_ci": ci(boot[:, 2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--prefixes", type=int, default=2)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="rome_sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    hp = rome.with_settings(rome.hparams_for(model), n_prefixes=args.prefixes)
    layers = list(range(0, model.config.num_hidden_layers, args.step))
    Cs = layer_stats.second_moments(model, tok, layers, hp.cov_tokens, hp.cov_source)
    facts = data.known_facts(model, tok, data.facts_in_split("test"))[: args.facts]
    print(f"{len(facts)} test facts x {len(layers)} layers")
    t0 = time.perf_counter()
    per_layer = {}
    for l in layers:
        ev = evaluation.evaluate(model, tok, facts, hparams=rome.with_settings(hp, layer=l), C=Cs[l], unedited=False)
        per_layer[l] = {m: ev.values("rome", m).tolist() for m in evaluation.METRICS}
        print(f"layer {l:2d}: " + "  ".join(f"{m} {ev.estimate('rome', m)}" for m in evaluation.MAGNITUDES), flush=True)
    traces = [tracing.trace_fact(model, tok, f.query(), kind="mlp", n_samples=args.samples, window=10) for f in facts]
    effects = np.array([tr.effects[tr.subject_span[1] - 1] for tr in traces])[:, layers]
    result = {"layers": layers, "fact_ids": [f.id for f in facts], "per_layer": per_layer,
              "tracing_effect": effects.tolist(), "seconds": time.perf_counter() - t0}
    for outcome in ("paraphrase_mag", "efficacy_mag"):
        Y = np.array([[per_layer[l][outcome][i] for l in layers] for i in range(len(facts))])
        result[f"hase_{outcome}"] = h = hase(Y, effects)
        print(f"{outcome}: R² layer {h['r2_layer']:.3f} {h['r2_layer_ci']}, layer + tracing {h['r2_both']:.3f} "
              f"{h['r2_both_ci']}, gain {h['gain']:.3f} {h['gain_ci']}, r {h['r']:.2f} {h['r_ci']}")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

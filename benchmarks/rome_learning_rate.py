"""Would a larger Adam step size make every ROME edit fast without making the edits worse?

    PYTHONPATH=. flock /tmp/engram-heavy.lock python benchmarks/rome_learning_rate.py [--facts 30] [--lrs 0.5 1 2]

The value optimization stops once the new object's NLL is below ``nll_stop``; a larger learning rate gets there
in fewer steps. This edits the first ``--facts`` known facts of the DEVELOPMENT split at the model's layer with
each learning rate (everything else from the model's settings), scores each edit with the CounterFact
magnitudes (one edit at a time, undone), and prints per setting the mean scores with bootstrap 95% intervals,
the seconds for k* and v* and how many edits took at most 4 s, then the paired difference of each score from
the first learning rate (bootstrap over facts, 2,000 resamples, seed 0). Writes every per-fact number to
``benchmarks/results/rome_learning_rate.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from engram_helpers import data, evaluation, rome
from engram_helpers.models import load_model, model_id

OUT = Path(__file__).parent / "results" / "rome_learning_rate.json"
SCORES = evaluation.MAGNITUDES + ("neighbourhood_kl",)


def paired(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over facts with a percentile bootstrap 95% interval."""
    x = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(2000, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    hp0 = rome.hparams_for(model)
    facts = data.known_facts(model, tok, data.facts_in_split("dev"))[: args.facts]
    print(f"{len(facts)} dev facts, layer {hp0.layer}, {hp0.n_prefixes} prefixes, up to {hp0.v_steps} steps, "
          f"{args.threads} threads")
    per_lr: dict[str, dict[str, list[float]]] = {}
    for lr in args.lrs:
        t0 = time.perf_counter()
        ev = evaluation.evaluate(model, tok, facts, hparams=rome.with_settings(hp0, v_lr=lr), unedited=False)
        per_lr[str(lr)] = {m: ev.values("rome", m).tolist() for m in SCORES + ("steps", "seconds")}
        secs = ev.values("rome", "seconds")
        print(f"lr {lr}: {time.perf_counter() - t0:.0f} s; "
              + "  ".join(f"{m} {ev.estimate('rome', m)}" for m in SCORES)
              + f"; seconds per edit {ev.estimate('rome', 'seconds')}, {int((secs <= 4).sum())} of {len(secs)} "
                f"within 4 s; steps {ev.values('rome', 'steps').astype(int).tolist()}", flush=True)
    base = str(args.lrs[0])
    diffs = {lr: {m: paired(per_lr[base][m], per_lr[lr][m]) for m in SCORES} for lr in per_lr if lr != base}
    for lr, d in diffs.items():
        print(f"lr {lr} minus lr {base}: " + "  ".join(f"{m} {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"
                                                      for m, v in d.items()))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"model": model_id(model), "split": "dev", "fact_ids": [f.id for f in facts],
                               "layer": hp0.layer, "threads": args.threads, "per_lr": per_lr,
                               "paired_difference_from": base, "paired_difference": diffs}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

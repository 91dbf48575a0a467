"""Can a ROME setting make every edit fast without making the edits worse?

    PYTHONPATH=. flock /tmp/engram-heavy.lock python benchmarks/rome_speed_settings.py \
        [--model smollm2-135m-offline] [--facts 30] [--variants v_lr=1 v_lr=2 v_steps=12] [--out FILE.json] \
        [--exclude EARLIER.json ...]

The value optimization stops once the new object's NLL is below ``nll_stop``, after at most ``v_steps`` Adam steps;
a larger learning rate gets there in fewer steps, a lower cap stops the hard edits sooner. This edits the first
``--facts`` known facts of the DEVELOPMENT split (less those of the ``--exclude`` records, for a check on
facts a choice did not see) at the model's layer with the model's settings and with each
variant (one setting changed), scores each edit with the CounterFact magnitudes (one edit at a time, undone), and
prints per variant the mean scores with bootstrap 95% intervals, the seconds for k* and v* and how many edits took
at most 4 s, then each variant's paired difference from the model's settings, also for the sum of the three
magnitudes (bootstrap over facts, 2,000 resamples, seed 0). Writes every per-fact number to ``--out`` (default
``benchmarks/results/rome_speed_settings.json``). Any setting of ``rome.HParams`` can vary, e.g. ``kl_factor=1``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from engram_helpers import data, evaluation, rome, stats, sweeps
from engram_helpers.models import DEFAULT_MODEL, load_model, model_id

OUT = Path(__file__).parent / "results" / "rome_speed_settings.json"
SCORES = evaluation.MAGNITUDES + ("neighbourhood_kl",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="an offline model (e.g. gemma-3-270m-offline) or a Hub name")
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=["v_lr=1", "v_lr=2", "v_steps=12"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT, help="the JSON record of every per-fact number")
    ap.add_argument("--exclude", nargs="*", default=[], help="JSON records (with fact_ids) whose facts to leave out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    hp0 = rome.hparams_for(model)
    try:
        variants = {"settings": {}} | {v: rome.setting_from_text(v, hp0) for v in args.variants}
    except ValueError as e:
        raise SystemExit(f"--variants: {e}") from None
    excluded = sweeps.recorded_fact_ids(args.exclude)
    facts = [f for f in data.known_facts(model, tok, data.facts_in_split("dev")) if f.id not in excluded][: args.facts]
    print(f"{len(facts)} dev facts, layer {hp0.layer}, lr {hp0.v_lr}, up to {hp0.v_steps} steps, {hp0.n_prefixes} "
          f"prefixes, {args.threads} threads")
    per: dict[str, dict[str, list[float]]] = {}
    for label, change in variants.items():
        t0 = time.perf_counter()
        ev = evaluation.evaluate(model, tok, facts, hparams=rome.with_settings(hp0, **change), unedited=False)
        per[label] = {m: ev.values("rome", m).tolist() for m in SCORES + ("steps", "seconds")}
        secs = ev.values("rome", "seconds")
        print(f"{label}: {time.perf_counter() - t0:.0f} s; "
              + "  ".join(f"{m} {ev.estimate('rome', m)}" for m in SCORES)
              + f"; seconds per edit {ev.estimate('rome', 'seconds')}, {int((secs <= 4).sum())} of {len(secs)} "
                f"within 4 s; steps {ev.values('rome', 'steps').astype(int).tolist()}", flush=True)
    for scores in per.values():  # each fact's three magnitudes added up, what the layer sweep ranks by
        scores["sum"] = np.sum([scores[m] for m in evaluation.MAGNITUDES], axis=0).tolist()
    diffs = {v: {m: stats.bootstrap(np.subtract(per[v][m], per["settings"][m])) for m in SCORES + ("sum",)}
             for v in per if v != "settings"}  # paired: per-fact differences, bootstrapped over facts
    for v, d in diffs.items():
        print(f"{v} minus the settings: " + "  ".join(f"{m} {x.mean:+.3f} [{x.lo:+.3f}, {x.hi:+.3f}]"
                                                     for m, x in d.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": model_id(model), "split": "dev", "fact_ids": [f.id for f in facts],
                                    "excluded": args.exclude,
                                    "settings": {k: getattr(hp0, k) for k in ("layer", "v_lr", "v_steps", "nll_stop",
                                                                                "n_prefixes", "kl_factor",
                                                                                "clamp_factor", "v_weight_decay")},
                                    "threads": args.threads, "per_variant": per,
                                    "paired_difference": {v: {m: [x.mean, x.lo, x.hi] for m, x in d.items()}
                                                          for v, d in diffs.items()}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The larger consolidation sweep: sequential ROME against one MEMIT batch at growing numbers of facts.

Runs the same comparison as ``notebooks/consolidation.ipynb`` (section 3) on more test facts and writes
the per-fact and per-text scores with bootstrap intervals to a JSON file. λ is taken from the command line
(the notebook chooses it on development facts). Run with ``make consolidation-sweep``, which runs:

    PYTHONPATH=$PWD python benchmarks/consolidation_sweep.py --counts 1 10 30 --threads 1

Each edit costs seconds to tens of seconds on a CPU (the value optimization): at 1, 10 and 30 facts with one
thread on a shared 2-core machine the run took 28 minutes (``benchmarks/README.md``). Counts above the
number of known test facts with distinct subjects (95 for the default model) are dropped.

``--isolated`` adds, to the results already written at ``--out``, the baseline the accumulated edits are read
against: each of the sweep's facts edited alone with the same ROME settings, scored and undone
(:func:`engram_helpers.memit.isolated_edits`), and per method the paired difference (bootstrap over facts)
between its scores after the largest count of edits and the isolated edits' scores, fact by fact.

``--when-made`` adds, to the same file, each sequential edit's scores right after it was made
(:func:`engram_helpers.memit.sequential_edits`): it runs the sequential ROME edits of the largest count again,
with the sweep's settings and threads, and records whether the scores at the end equal the sweep's (the run is
deterministic on one machine). An edit "lost" by the end is then one that took when it was made. Sweeps run
after this option existed store these scores in their rows already.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from engram_helpers import data, evaluation, layer_stats, memit, rome, stats
from engram_helpers.models import load_model

METRICS = ("efficacy", "paraphrase", "neighbourhood", "accuracy", "entropy")


def _interval(values, seed: int) -> list[float]:
    e = stats.bootstrap(values, seed=seed)
    return [e.mean, e.lo, e.hi]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 30, 100])
    ap.add_argument("--lam", type=float, default=memit.DEFAULT_LAMBDA)
    ap.add_argument("--n-prefixes", type=int, default=2)
    ap.add_argument("--cov-tokens", type=int, default=20_000)
    ap.add_argument("--n-texts", type=int, default=24)
    ap.add_argument("--n-gen", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/consolidation_sweep.json")
    ap.add_argument("--isolated", action="store_true",
                    help="add the isolated-edit baseline to the results at --out (the sweep is not rerun)")
    ap.add_argument("--when-made", action="store_true",
                    help="add each sequential edit's scores when it was made to the results at --out")
    args = ap.parse_args()
    if args.isolated:
        add_isolated(Path(args.out), args.threads, args.seed)
        return
    if args.when_made:
        add_when_made(Path(args.out))
        return

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = load_model()
    facts = data.load_facts()
    known = data.known_facts(model, tok, facts)
    test = memit.edit_order(data.facts_in_split("test", known))
    counts = [n for n in args.counts if n <= len(test)]
    if counts != sorted(args.counts):
        print(f"only {len(test)} known test facts with distinct subjects: counts {args.counts} -> {counts}")
    base = memit.hparams_for(model)
    value = rome.with_settings(base.value, n_prefixes=args.n_prefixes, cov_tokens=args.cov_tokens)
    hp = memit.MemitHParams(base.layers, args.lam, value)
    rome_hp = sweep_rome_settings(model, base.layers[-1], args.n_prefixes, args.cov_tokens)
    Cs = layer_stats.second_moments(model, tok, sorted(set(hp.layers) | {rome_hp.layer}), n_tokens=args.cov_tokens)

    # C used the first articles of this seeded order; the last ones are held out (as in the notebook)
    texts = list(layer_stats.texts("bbc", model, tok, seed=0))[-args.n_texts:]
    gen_prompts = [f.prompt for f in test[:args.n_gen]]

    rows = memit.sequential_vs_batch(model, tok, test, counts, Cs, hp, rome_hp, texts, gen_prompts,
                                     args.gen_tokens, verbose=True)
    summary = [{"method": r["method"], "n": r["n"], "seconds": r["seconds"],
                **{m: _interval(r[m], args.seed) for m in METRICS}} for r in rows]
    out = {"command": " ".join(["python", *sys.argv]), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "torch": torch.__version__, "args": vars(args), "layers": list(hp.layers), "rome_layer": rome_hp.layer,
           "n_known": len(known), "n_test_distinct": len(test), "threads": args.threads,
           "machine": platform.platform(), "wall_seconds": time.perf_counter() - start,
           "summary": summary, "rows": rows, "facts": [f.id for f in test[:counts[-1]]]}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    for s in summary:
        print(f"{s['method']:9} n={s['n']:3}: " + ", ".join(f"{m} {s[m][0]:.3f} [{s[m][1]:.3f}, {s[m][2]:.3f}]"
                                                          for m in METRICS))
    print(f"wrote {path} after {out['wall_seconds']:.0f} s")


def sweep_rome_settings(model, layer: int, n_prefixes: int, cov_tokens: int) -> rome.HParams:
    """The sweep's sequential ROME: the model's settings at ``layer`` (MEMIT's last critical layer)."""
    return rome.with_settings(rome.hparams_for(model), layer=layer, n_prefixes=n_prefixes, cov_tokens=cov_tokens)


def _sweep_setup(out: dict, threads: int):
    """The model, the sweep's facts, its sequential ROME settings and their C, from a sweep's results."""
    torch.set_num_threads(threads)
    model, tok = load_model()
    by_id = {f.id: f for f in data.load_facts()}
    facts = [by_id[i] for i in out["facts"]]
    a = out["args"]
    rome_hp = sweep_rome_settings(model, out["rome_layer"], a["n_prefixes"], a["cov_tokens"])
    C = layer_stats.second_moments(model, tok, [rome_hp.layer], n_tokens=a["cov_tokens"])[rome_hp.layer]
    return model, tok, facts, rome_hp, C


def add_when_made(path: Path) -> None:
    """The sequential edits of the sweep at ``path`` made again, each scored when made; written into the file."""
    out = json.loads(path.read_text(encoding="utf-8"))
    model, tok, facts, rome_hp, C = _sweep_setup(out, out["threads"])
    n = len(facts)
    start = time.perf_counter()
    [last] = memit.sequential_edits(model, tok, facts, [n], C, rome_hp, lambda k, seconds: {
        "edit_seconds": seconds, **memit.score_facts(model, tok, facts[:k])})
    wall = time.perf_counter() - start  # the edits, each fact's scoring when made, and the scoring at the end
    sweep_last = next(r for r in out["rows"] if r["method"] == "rome_seq" and r["n"] == n)
    scores = evaluation.WIN_RATES
    same = all(np.allclose(last[m], sweep_last[m]) for m in scores)
    out["when_made"] = {"command": " ".join(["python", *sys.argv]),
                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "threads": out["threads"],
                        "seconds": last["edit_seconds"], "wall_seconds": wall, "n": n,
                        "per_fact": last["when_made"], "end": {m: last[m] for m in scores},
                        "end_equals_sweep": bool(same)}
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    made = last["when_made"]["efficacy"]
    lost = [i for i in range(n) if made[i] == 1 and last["efficacy"][i] == 0]
    print(f"{int(sum(made))} of {n} edits took when made; lost by the end: {lost}; never took: "
          f"{[i for i in range(n) if made[i] == 0]}; end scores equal the sweep's: {same}")
    print(f"wrote {path}: {last['edit_seconds']:.0f} s of edits, {wall:.0f} s with the scoring")


def add_isolated(path: Path, threads: int, seed: int) -> None:
    """Each fact of the sweep at ``path`` edited alone, with the sweep's ROME settings; written into the file."""
    out = json.loads(path.read_text(encoding="utf-8"))
    model, tok, facts, rome_hp, C = _sweep_setup(out, threads)
    start = time.perf_counter()
    iso = memit.isolated_edits(model, tok, facts, C, rome_hp)
    seconds = time.perf_counter() - start
    n = len(facts)
    last = {r["method"]: r for r in out["rows"] if r["n"] == n}
    scores = evaluation.WIN_RATES
    out["isolated"] = {
        "command": " ".join(["python", *sys.argv]), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "threads": threads, "seconds": seconds, "n": n, "per_fact": iso,
        "summary": {m: _interval(iso[m], seed) for m in scores},
        "paired_minus_isolated": {method: {m: _interval(np.subtract(last[method][m], iso[m]), seed) for m in scores}
                                  for method in ("rome_seq", "memit")}}
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    for m in scores:
        print(f"isolated {m} {out['isolated']['summary'][m]}; after {n} edits minus isolated: " + ", ".join(
            f"{method} {out['isolated']['paired_minus_isolated'][method][m]}" for method in ("rome_seq", "memit")))
    print(f"wrote {path} after {seconds:.0f} s of edits")


if __name__ == "__main__":
    main()

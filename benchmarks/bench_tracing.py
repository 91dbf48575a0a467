"""Benchmark: causal tracing (tracing.trace_fact) against the paper's plain loop (trace_fact_plain).

Run by hand from the repository root (about 15 minutes on 2 CPU cores):

    flock /tmp/engram-heavy.lock .venv/bin/python benchmarks/bench_tracing.py [--threads 2] [--model NAME]

For each of two prompts of different lengths (default: a 12-token and a 6-token one, counting the
``<|endoftext|>`` prefix) and each kind, both implementations trace the same query with the same noise;
the script checks that they give the same scores and prints the time of each, each kind's ratio and the
total; then ``trace_all`` (the three kinds in shared passes, as the notebook traces) against the sum of
the plain loop's three kinds. ``--bf16`` also times trace_fact with the model in bfloat16 and prints its
largest difference from float32. Results are written by hand in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import numpy as np
import torch

from engram_helpers import tracing
from engram_helpers.models import DEFAULT_MODEL, load_model
from engram_helpers.query import Query

PROMPTS = [
    Query("The {} is located in the city of", "Eiffel Tower", "Paris"),
    Query("The capital of {} is", "France", "Paris"),
]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="also time trace_fact in bfloat16")
    parser.add_argument("--skip-plain", action="store_true", help="time trace_fact only")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    std = tracing.noise_level(model, tok)
    kw = dict(noise_std=std, n_samples=args.samples, window=args.window, seed=0)
    print(f"{args.model} on {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.samples} noise samples of std {std:.4f}, window {args.window}")
    tracing.trace_fact(model, tok, PROMPTS[1], kind="layer", **kw)  # warm-up
    low = copy.deepcopy(model).to(torch.bfloat16) if args.bf16 else None

    grand_fast = grand_plain = grand_all = 0.0
    for query in PROMPTS:
        n_tokens = len(tracing.trace_fact(model, tok, query, kind="layer", n_samples=1, noise_std=std).tokens)
        print(f"\n{query.prompt!r} -> {query.target!r}, subject {query.subject!r}, {n_tokens} tokens")
        print(f"{'kind':6} {'plain (s)':>10} {'fast (s)':>9} {'ratio':>7} {'max |diff|':>11}"
              + (f" {'bf16 (s)':>9} {'bf16 |diff|':>12}" if low is not None else ""))
        total_fast = total_plain = 0.0
        by_kind = {}
        for kind in tracing.KINDS:
            fast, t_fast = timed(tracing.trace_fact, model, tok, query, kind=kind, **kw)
            by_kind[kind] = fast
            line = f"{kind:6} "
            if args.skip_plain:
                line += f"{'-':>10} {t_fast:9.1f} {'-':>7} {'-':>11}"
            else:
                plain, t_plain = timed(tracing.trace_fact_plain, model, tok, query, kind=kind, **kw)
                diff = float(np.abs(fast.scores - plain.scores).max())
                if diff > 1e-5:
                    raise SystemExit(f"The two implementations disagree for kind {kind!r}: max difference {diff:.2e}")
                total_plain += t_plain
                line += f"{t_plain:10.1f} {t_fast:9.1f} {t_plain / t_fast:6.1f}x {diff:11.1e}"
            total_fast += t_fast
            if low is not None:
                half, t_half = timed(tracing.trace_fact, low, tok, query, kind=kind, **kw)
                line += f" {t_half:9.1f} {float(np.abs(half.scores - fast.scores).max()):12.1e}"
            print(line, flush=True)
        together, t_all = timed(tracing.trace_all, model, tok, query, **kw)
        if not args.skip_plain:
            print(f"{'all':6} {total_plain:10.1f} {total_fast:9.1f} {total_plain / total_fast:6.1f}x")
            print(f"{'shared':6} {total_plain:10.1f} {t_all:9.1f} {total_plain / t_all:6.1f}x   (trace_all, "
                  f"three kinds in shared passes)", flush=True)
        else:
            print(f"{'shared':6} {'-':>10} {t_all:9.1f}   (trace_all)")
        same = max(float(np.abs(together[k].scores - by_kind[k].scores).max()) for k in tracing.KINDS)
        if same > 1e-5:
            raise SystemExit(f"trace_all and trace_fact disagree: max difference {same:.2e}")
        grand_all += t_all
        grand_fast += total_fast
        grand_plain += total_plain
        print(f"clean p({query.target}) = {fast.clean_prob:.3f}, corrupted = {fast.corrupted_prob:.3f}")
    if not args.skip_plain:
        print(f"\nboth prompts, all kinds: plain {grand_plain:.1f} s, fast {grand_fast:.1f} s, "
              f"{grand_plain / grand_fast:.1f}x; trace_all {grand_all:.1f} s, {grand_plain / grand_all:.1f}x")


if __name__ == "__main__":
    main()

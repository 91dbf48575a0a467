"""Benchmark: batched causal tracing (tracing.trace_fact) against the paper's plain loop (trace_fact_plain).

Run by hand from the repository root (about 3 minutes on 2 CPU cores):

    flock /tmp/engram-heavy.lock .venv/bin/python benchmarks/bench_tracing.py [--threads 2] [--model NAME]

Both use the same model, prompt, noise samples and settings; the script checks that they give the same
scores and prints the time of each and the speed ratio. Results are written by hand in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from engram_helpers import tracing
from engram_helpers.models import DEFAULT_MODEL, load_model


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="Eiffel Tower")
    parser.add_argument("--target", default="Paris")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    std = tracing.noise_level(model, tok)
    kw = dict(target=args.target, noise_std=std, n_samples=args.samples, window=args.window, seed=0)
    print(f"{args.model} on {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}; prompt {args.prompt!r}, subject {args.subject!r}, "
          f"{args.samples} noise samples of std {std:.3f}, window {args.window}")
    tracing.trace_fact(model, tok, args.prompt, args.subject, kind="layer", **kw)  # warm-up

    total_fast = total_plain = 0.0
    print(f"{'kind':6} {'plain (s)':>10} {'batched (s)':>12} {'ratio':>7} {'max |diff|':>11}")
    for kind in tracing.KINDS:
        fast, t_fast = timed(tracing.trace_fact, model, tok, args.prompt, args.subject, kind=kind, **kw)
        plain, t_plain = timed(tracing.trace_fact_plain, model, tok, args.prompt, args.subject, kind=kind, **kw)
        diff = float(np.abs(fast.scores - plain.scores).max())
        if diff > 1e-4:
            raise SystemExit(f"The two implementations disagree for kind {kind!r}: max difference {diff:.2e}")
        total_fast += t_fast
        total_plain += t_plain
        print(f"{kind:6} {t_plain:10.1f} {t_fast:12.1f} {t_plain / t_fast:6.1f}x {diff:11.1e}")
    print(f"{'all':6} {total_plain:10.1f} {total_fast:12.1f} {total_plain / total_fast:6.1f}x")
    print(f"clean p({args.target}) = {fast.clean_prob:.3f}, corrupted = {fast.corrupted_prob:.3f}")


if __name__ == "__main__":
    main()

"""Where is skill localization strongest? Grafting on MiniLM + tweets under several fine-tuning regimes.

Run by hand (about 10 minutes on 1 CPU thread):
    OMP_NUM_THREADS=1 python benchmarks/grafting_regimes.py
Prints one line per (regime, graft size): zero-shot, fine-tuned, base patch, trained mask (top-k and the
σ(S) > 0.5 rule with its size), random region, and the share of the fine-tuning gain the best top-k graft recovers.
"""

from __future__ import annotations

import sys
import time

import torch

from engram_helpers import grafting as G
from engram_helpers import textdata as T

REGIMES = [  # (shots per class, optimizer, learning rate, steps)
    (64, "sgd", 0.05, 64),
    (16, "sgd", 0.05, 32),
    (64, "sgd", 0.01, 64),
    (256, "sgd", 0.05, 128),
    (64, "adamw", 2e-5, 64),
]
FRACTIONS = [1e-4, 1e-3]


def main(seed: int = 0) -> None:
    torch.set_num_threads(1)
    encoder, tok = G.load_encoder()
    tweets = T.load_tweets()
    model = G.label_classifier(encoder, tok, ["This is terrible.", "This is great!"])
    names = G.graftable_names(model)
    pre = G.snapshot(model, names)
    for shots, opt, lr, steps in REGIMES:
        train, test = T.split(tweets, shots, 300, seed=seed)
        trb = G.tokenize(tok, train.texts, train.labels, batch_size=16, sort=False)
        teb = G.tokenize(tok, test.texts, test.labels, batch_size=128)
        t0 = time.perf_counter()
        ft = G.finetune(model, trb, names, steps=steps, lr=lr, seed=seed, optimizer=opt)
        delta = G.difference(ft, pre)
        zs, fa = G.accuracy(model, teb), G.accuracy(model, teb, ft)
        for frac in FRACTIONS:
            k = G.size_for(pre, frac)
            base = G.accuracy(model, teb, G.graft(pre, delta, G.base_patch(delta, k)))
            rand = G.accuracy(model, teb, G.graft(pre, delta, G.random_mask(pre, k, seed)))
            S = G.train_mask(model, pre, delta, trb, k, steps=24, lr=1e5, seed=seed)
            top = G.accuracy(model, teb, G.graft(pre, delta, G.binarize_topk(S, k)))
            half = G.binarize_threshold(S)
            thr = G.accuracy(model, teb, G.graft(pre, delta, half))
            gain = G.recovery(max(top, base), zs, fa)[1]
            print(f"shots={shots:3d} {opt:5s} lr={lr:g} steps={steps:3d} | frac={frac:.2%} k={k:6d} | "
                  f"zero-shot {zs:.3f} "
                  f"ft {fa:.3f} base {base:.3f} trained {top:.3f} (>0.5: {thr:.3f}, size {G.mask_size(half)}) "
                  f"random {rand:.3f} | gain recovered {gain:.2f} | {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)

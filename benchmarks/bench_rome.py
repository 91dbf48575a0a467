"""Seconds per ROME edit (k* and v*, C cached), the library's value optimization against the plain loop.

    PYTHONPATH=. flock /tmp/engram-heavy.lock python benchmarks/bench_rome.py --facts 6 --threads 1 2

The plain loop is the course's earlier implementation (and the paper's): every Adam step runs the whole
model on every context prompt and computes logits at every position. The variants add one change at a time:

- ``plain``: full forward and full [batch, seq, vocab] logits each step;
- ``logits``: the same, but logits only at the scored positions (``logits_to_keep``);
- ``library``: :func:`engram_helpers.rome.compute_value`: positions before the subject's last token run
  once and their key-value cache is reused, the layers below the edit run once and are replayed, the
  target's last token is not fed in, and only the scored logits are computed.

All variants optimize the same loss; the script prints the final NLL of each, so a speed-up that changed
the optimization would show. Facts: the first known facts of the development split.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from engram_helpers import data, layer_stats, rome
from engram_helpers.hooks import trace
from engram_helpers.models import _answer_batch, answer_ids, arch, load_model, mlp_out_weight
from engram_helpers.query import Query, contexts, subject_last


def value_plain(model, tok, query: Query, key, hp: rome.HParams, prefixes, keep_logits: bool = False) -> list[float]:
    """The plain value optimization (full forward per step); returns the NLL per step."""
    target = answer_ids(tok, query.target)
    W = mlp_out_weight(model, hp.layer)
    out_init = W.detach().float() @ key.float()
    qs = contexts(query, list(prefixes)) + [Query("{} is a", query.subject)]
    n_rw = len(qs) - 1
    input_ids, mask, pred_pos = _answer_batch(tok, [q.prompt for q in qs], [target] * n_rw + [[]], "cpu")
    kl_pos = int(mask[-1].sum()) - 1
    sidx = torch.tensor([subject_last(tok, q) for q in qs])
    rows = torch.arange(len(qs))
    pos = torch.tensor(pred_pos[:n_rw])
    keep = torch.unique(torch.cat([pos.flatten(), torch.tensor([kl_pos])])) if keep_logits else None
    col = {int(c): i for i, c in enumerate(keep.tolist())} if keep_logits else None
    tgt = torch.tensor(target)
    delta = torch.zeros_like(out_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_factor * out_init.norm()
    init_kl, nlls = None, []

    def add(out):
        out = out.clone()
        out[rows, sidx] = out[rows, sidx] + delta
        return out

    for _ in range(hp.v_steps):
        with torch.enable_grad(), trace(model, arch(model).mlp_name(hp.layer), retain_output=False, edit_output=add):
            kw = {"logits_to_keep": keep} if keep_logits else {}
            logits = model(input_ids=input_ids, attention_mask=mask, **kw).logits.float()
            p = pos if not keep_logits else torch.tensor([[col[int(c)] for c in r] for r in pos.tolist()])
            kp = kl_pos if not keep_logits else col[kl_pos]
            logp = torch.log_softmax(logits[torch.arange(n_rw)[:, None], p], -1)
            nll = -logp[torch.arange(n_rw)[:, None], torch.arange(len(target))[None, :], tgt[None, :]].mean()
            kl_logp = torch.log_softmax(logits[n_rw, kp], -1)
            init_kl = kl_logp.detach() if init_kl is None else init_kl
            kl = F.kl_div(init_kl, kl_logp, log_target=True, reduction="sum")
            total = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / out_init.norm() ** 2
        nlls.append(nll.item())
        if nlls[-1] < hp.nll_stop:
            break
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return nlls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=["plain", "logits", "library"])
    args = ap.parse_args()
    model, tok = load_model()
    hp = rome.hparams_for(model)
    layer_stats.second_moment(model, tok, hp.layer, hp.cov_tokens, hp.cov_source)  # cached
    prefixes = rome.context_prefixes(model, tok, hp.n_prefixes, hp.prefix_len)
    facts = data.known_facts(model, tok, data.facts_in_split("dev"))[: args.facts]
    print(f"{len(facts)} dev facts, layer {hp.layer}, {hp.n_prefixes} prefixes, up to {hp.v_steps} steps")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for variant in args.variants:
            secs, steps, last = [], [], []
            for f in facts:
                q = f.query(f.target_new)
                t0 = time.perf_counter()
                key = rome.compute_key(model, tok, q, hp.layer, prefixes)
                if variant == "library":
                    nlls = [s["nll"] for s in rome.compute_value(model, tok, q, key, hp, prefixes).losses]
                else:
                    nlls = value_plain(model, tok, q, key, hp, prefixes, keep_logits=variant == "logits")
                secs.append(time.perf_counter() - t0)
                steps.append(len(nlls))
                last.append(nlls[-1])
            print(f"threads {threads}  {variant:8}  median {statistics.median(secs):5.2f} s per edit "
                  f"(min {min(secs):.2f}, max {max(secs):.2f}; {sum(s <= 4 for s in secs)} of {len(secs)} within 4 s); "
                  f"steps {steps}; final NLL "
                  f"{[round(x, 3) for x in last]}", flush=True)


if __name__ == "__main__":
    main()

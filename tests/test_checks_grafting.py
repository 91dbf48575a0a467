"""Each grafting check passes the library's reference and fails known-wrong implementations with a hint."""

from __future__ import annotations

import pytest
import torch

from engram_helpers import grafting as G
from engram_helpers.checks import CheckFailed
from engram_helpers.checks import grafting as C


def test_reference_implementations_pass():
    C.check_graft(G.graft)
    C.check_base_patch(G.base_patch)
    C.check_binarize_topk(G.binarize_topk)
    C.check_lesion(G.lesion)
    C.check_layer_budget_patch(G.layer_budget_patch)


# --- graft ------------------------------------------------------------------------------------------------


def graft_without_pre(pre, delta, gamma):  # returns γ ⊙ δ, forgetting θ_pre
    return {n: gamma.get(n, torch.zeros_like(p)).float() * delta[n] for n, p in pre.items()}


def graft_reversed(pre, delta, gamma):  # grafts where γ is 0
    return {n: pre[n] + (1 - gamma.get(n, torch.zeros_like(p)).float()) * delta[n] for n, p in pre.items()}


def graft_in_place(pre, delta, gamma):
    for n in pre:
        if n in gamma:
            pre[n] += gamma[n].float() * delta[n]
    return pre


def graft_drops_missing(pre, delta, gamma):  # forgets names missing from gamma
    return {n: pre[n] + g.float() * delta[n] for n, g in gamma.items()}


def graft_bool_only(pre, delta, gamma):  # treats any non-zero γ as 1
    return {n: torch.where(gamma[n].bool(), pre[n] + delta[n], pre[n]) if n in gamma else pre[n] for n in pre}


@pytest.mark.parametrize("wrong, hint", [
    (graft_without_pre, "θ_pre"),
    (graft_reversed, "γ = 0"),
    (graft_in_place, "in place"),
    (graft_drops_missing, "keys"),
    (graft_bool_only, "interpolates"),
])
def test_check_graft_catches(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        C.check_graft(wrong)


# --- base patch -------------------------------------------------------------------------------------------


def base_patch_signed(delta, k):  # ranks the signed change
    return G.binarize_topk(delta, k)


def base_patch_per_tensor(delta, k):  # k per tensor
    out = {}
    for n, d in delta.items():
        flat = torch.zeros(d.numel(), dtype=torch.bool)
        flat[torch.topk(d.abs().reshape(-1), min(k, d.numel())).indices] = True
        out[n] = flat.reshape(d.shape)
    return out


def base_patch_threshold(delta, k):  # >= the k-th largest value, then as floats
    flat = torch.cat([d.abs().reshape(-1) for d in delta.values()])
    cut = torch.topk(flat, k).values[-1]
    return {n: (d.abs() >= cut).float() for n, d in delta.items()}


@pytest.mark.parametrize("wrong, hint", [
    (base_patch_signed, r"\|δ\|"),
    (base_patch_per_tensor, "all tensors"),
    (base_patch_threshold, "boolean"),
])
def test_check_base_patch_catches(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        C.check_base_patch(wrong)


# --- binarization -----------------------------------------------------------------------------------------


def topk_by_magnitude(scores, k):  # |S| instead of S
    return G.binarize_topk({n: s.abs() for n, s in scores.items()}, k)


def topk_with_ties(scores, k):  # threshold at the k-th value: ties inflate the size
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    if k == 0:
        return {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}
    cut = torch.topk(flat, k).values[-1]
    return {n: s >= cut for n, s in scores.items()}


def threshold_instead(scores, k):  # the >0.5 rule ignores k
    return G.binarize_threshold(scores)


@pytest.mark.parametrize("wrong, hint", [
    (topk_by_magnitude, "signed"),
    (topk_with_ties, "tied"),
    (threshold_instead, "k largest"),
])
def test_check_binarize_catches(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        C.check_binarize_topk(wrong)


# --- lesion -----------------------------------------------------------------------------------------------


def lesion_reversed(theta, reference, region):
    return {n: torch.where(region[n], t, reference[n]) if n in region else t for n, t in theta.items()}


def lesion_zeroes(theta, reference, region):  # zeroes the region instead of resetting it
    return {n: torch.where(region[n], torch.zeros_like(t), t) if n in region else t for n, t in theta.items()}


def lesion_all_missing(theta, reference, region):  # resets names missing from region entirely
    return {n: torch.where(region[n], reference[n], t) if n in region else reference[n] for n, t in theta.items()}


@pytest.mark.parametrize("wrong, hint", [
    (lesion_reversed, "right way round"),
    (lesion_zeroes, "reference"),
    (lesion_all_missing, "not lesioned"),
])
def test_check_lesion_catches(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        C.check_lesion(wrong)


# --- layer budget (the experiment exercise) --------------------------------------------------------------


def budget_global(delta, k):  # the base patch: all layers ranked together
    return G.base_patch(delta, k)


def budget_k_per_layer(delta, k):  # k entries in every layer instead of k in total
    out = {}
    for layer in sorted({G.param_layer(n) for n in delta}):
        part = {n: d for n, d in delta.items() if G.param_layer(n) == layer}
        out.update(G.base_patch(part, min(k, G.n_params(part))))
    return out


def budget_signed(delta, k):  # ranks the signed change, not |δ|
    return G.layer_budget_patch({n: d.clamp(min=0) for n, d in delta.items()}, k)


def budget_per_tensor(delta, k):  # an even budget per tensor instead of per layer
    names = list(delta)
    out = {}
    for i, n in enumerate(names):
        share = k // len(names) + (1 if i < k % len(names) else 0)
        out.update(G.base_patch({n: delta[n]}, min(share, delta[n].numel())))
    return out


@pytest.mark.parametrize("wrong, hint", [
    (budget_global, "not a per-layer"),
    (budget_k_per_layer, "in total"),
    (budget_signed, "absolute"),
    (budget_per_tensor, "layer"),
])
def test_check_layer_budget_patch_catches(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        C.check_layer_budget_patch(wrong)

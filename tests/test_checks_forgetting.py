"""Each forgetting check passes the library's reference and fails known-wrong implementations with a hint."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from engram_helpers import forgetting as F
from engram_helpers import weights
from engram_helpers.checks import CheckFailed
from engram_helpers.checks import forgetting as C
from engram_helpers.hooks import get_module
from engram_helpers.models import arch


def test_reference_implementations_pass():
    C.check_random_weight_mask(F.random_weight_mask)
    C.check_lesioned(weights.zero_where)  # the library's one way to lesion: a WeightChange is a context manager
    C.check_token_rank(F.token_rank)
    C.check_output_norm_neurons(F.output_norm_neurons)


# --- random_weight_mask -----------------------------------------------------------------------------------


def mask_bernoulli(params, fraction, seed=0):  # about k entries, not exactly k
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < fraction for n, p in params.items()}


def mask_unseeded(params, fraction, seed=0):
    out = {}
    for n, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel())[:round(fraction * p.numel())]] = True
        out[n] = flat.reshape(p.shape)
    return out


def mask_first_k(params, fraction, seed=0):  # always the first entries: not random
    if not 0 <= fraction <= 1:
        raise ValueError("fraction")
    out = {}
    for n, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[:round(fraction * p.numel())] = True
        out[n] = flat.reshape(p.shape)
    return out


def mask_no_validation(params, fraction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in params.items():
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=gen)[:max(0, round(fraction * p.numel()))]] = True
        out[n] = flat.reshape(p.shape)
    return out


def mask_float(params, fraction, seed=0):
    return {n: m.float() for n, m in F.random_weight_mask(params, fraction, seed).items()}


@pytest.mark.parametrize("wrong", [mask_bernoulli, mask_unseeded, mask_first_k, mask_no_validation, mask_float])
def test_random_weight_mask_rejects(wrong):
    with pytest.raises(CheckFailed):
        C.check_random_weight_mask(wrong)


# --- lesioned ---------------------------------------------------------------------------------------------


@contextmanager
def lesion_never_restores(model, masks):
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            named[n][m] = 0.0
    yield model


@contextmanager
def lesion_not_on_error(model, masks):
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in masks}
    with torch.no_grad():
        for n, m in masks.items():
            named[n][m] = 0.0
    yield model  # no try/finally: an error skips the restore
    with torch.no_grad():
        for n, v in saved.items():
            named[n].copy_(v)


@contextmanager
def lesion_whole_tensor(model, masks):
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n in masks:
                named[n].zero_()
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                named[n].copy_(v)


@contextmanager
def lesion_inverted(model, masks):
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                named[n][~m] = 0.0
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                named[n].copy_(v)


@contextmanager
def lesion_scaled_restore(model, masks):  # restores through arithmetic, not exactly
    named = dict(model.named_parameters())
    saved = {n: named[n].detach().clone() for n in masks}
    try:
        with torch.no_grad():
            for n, m in masks.items():
                named[n][m] = 0.0
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                named[n].copy_(v * 3 / 3 + 1e-7)


@pytest.mark.parametrize("wrong", [lesion_never_restores, lesion_not_on_error, lesion_whole_tensor,
                                   lesion_inverted, lesion_scaled_restore])
def test_lesioned_rejects(wrong):
    with pytest.raises(CheckFailed):
        C.check_lesioned(wrong)


# --- token_rank -------------------------------------------------------------------------------------------


def rank_one_based(probs, ids):
    return F.token_rank(probs, ids) + 1


def rank_ties_against(probs, ids):
    target = probs.gather(1, ids[:, None])
    return (probs >= target).sum(1) - 1 + (probs == target).sum(1) - 1


def rank_wrong_row(probs, ids):  # compares every row with row 0's target
    target = probs[0, ids][:, None]
    return (probs > target).sum(1)


def rank_list(probs, ids):
    return F.token_rank(probs, ids).tolist()


def rank_of_argsort_position(probs, ids):  # position of the token id in ascending order
    return torch.argsort(probs, dim=1).argsort(dim=1).gather(1, ids[:, None])[:, 0]


@pytest.mark.parametrize("wrong", [rank_one_based, rank_ties_against, rank_wrong_row, rank_list,
                                   rank_of_argsort_position])
def test_token_rank_rejects(wrong):
    with pytest.raises(CheckFailed):
        C.check_token_rank(wrong)


# --- output_norm_neurons (the experiment exercise) -------------------------------------------------------


def norm_ignores_exclude(model, k, exclude=None):
    return F.top_neurons(F.output_norms(model), k)


def norm_of_inputs(model, k, exclude=None):  # ranks the MLP's input weights (what a neuron reads), not its output
    a = arch(model)
    rows = []
    for layer in range(a.n_layers):
        w = get_module(model, a.mlp_out_name(layer)).weight
        w_in = [p for n, p in model.named_parameters() if f".{layer}." in n and ("up_proj" in n or "c_fc" in n)][0]
        rows.append(w_in.norm(dim=1) if not a.out_proj_is_conv1d else w_in.norm(dim=0))
        assert w is not None
    return F.top_neurons(torch.stack(rows).float(), k, exclude)


def norm_per_layer(model, k, exclude=None):  # k neurons in every layer
    norms = F.output_norms(model)
    if exclude is not None:
        norms = norms.masked_fill(exclude, float("-inf"))
    out = torch.zeros(norms.shape, dtype=torch.bool)
    for layer in range(norms.shape[0]):
        out[layer, norms[layer].topk(min(k, norms.shape[1])).indices] = True
    return out


def norm_smallest(model, k, exclude=None):
    return F.top_neurons(-F.output_norms(model), k, exclude)


def norm_wrong_axis(model, k, exclude=None):  # the norm over the wrong dimension of a Llama projection
    a = arch(model)
    rows = [get_module(model, a.mlp_out_name(layer)).weight.norm(dim=1 if not a.out_proj_is_conv1d else 0)
            for layer in range(a.n_layers)]
    d = F.mlp_shape(model)[1]
    scores = torch.stack([torch.cat([r, r.new_zeros(max(0, d - r.numel()))])[:d] for r in rows]).float()
    return F.top_neurons(scores, k, exclude)


def norm_in_place(model, k, exclude=None):  # zeroes the excluded neurons' weights to skip them
    if exclude is not None:
        with torch.no_grad():
            for layer, neuron in exclude.nonzero().tolist():
                w = get_module(model, arch(model).mlp_out_name(layer)).weight
                if arch(model).out_proj_is_conv1d:
                    w[neuron] = 0
                else:
                    w[:, neuron] = 0
    return F.top_neurons(F.output_norms(model), k)


def norm_no_error(model, k, exclude=None):
    norms = F.output_norms(model)
    if exclude is not None:
        norms = norms.masked_fill(exclude, float("-inf"))
    k = min(k, int(torch.isfinite(norms).sum()))
    out = torch.zeros(norms.shape, dtype=torch.bool)
    out.view(-1)[norms.reshape(-1).topk(k).indices] = True
    return out


@pytest.mark.parametrize("wrong, hint", [
    (norm_ignores_exclude, "exclude"),
    (norm_of_inputs, "longest output vectors"),
    (norm_per_layer, "not k per layer"),
    (norm_smallest, "largest first"),
    (norm_wrong_axis, "longest output vectors"),
    (norm_in_place, "modify the model"),
    (norm_no_error, "ValueError"),
])
def test_check_output_norm_neurons_catches(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        C.check_output_norm_neurons(wrong)

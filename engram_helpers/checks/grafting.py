"""Checks for the grafting notebook's exercises: the graft, the base patch, top-k binarization, the lesion, and
the per-layer budget of the experiment exercise.

Each check runs the reader's function on small seeded parameter dictionaries and compares it with
:mod:`engram_helpers.grafting`; a mismatch raises :class:`CheckFailed` with the likely cause.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import grafting as ref
from . import CheckFailed, assert_close, passed


def _params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layer.0.w": (4, 3), "layer.0.b": (4,), "layer.1.w": (3, 5)}
    return {n: scale * torch.randn(s, generator=g) for n, s in shapes.items()}


def _clone(p):
    return {n: t.clone() for n, t in p.items()}


def _call(fn: Callable, *args):
    """Call the reader's function on copies; fail if it changed its inputs."""
    copies = [_clone(a) if isinstance(a, dict) else a for a in args]
    out = fn(*copies)
    for a, c in zip(args, copies):
        if isinstance(a, dict) and any(not torch.equal(a[n], c[n]) for n in a):
            raise CheckFailed("Your function changed its input tensors in place. Build new tensors instead "
                              "(e.g. torch.where or arithmetic that returns a new tensor).")
    if not isinstance(out, dict):
        raise CheckFailed(f"Return a dict {{parameter name: tensor}}, got {type(out).__name__}.")
    return out


def _compare(got: dict, expected: dict, what: str, hint: str) -> None:
    if set(got) != set(expected):
        raise CheckFailed(f"{what}: keys {sorted(got)}, expected {sorted(expected)}. Return one entry per "
                          f"parameter name, also for names the mask leaves out.")
    for n in expected:
        if expected[n].dtype == torch.bool:
            if not isinstance(got[n], torch.Tensor) or got[n].dtype != torch.bool:
                raise CheckFailed(f"{what}[{n!r}] must be a boolean tensor (dtype torch.bool). {hint}")
            if got[n].shape != expected[n].shape:
                raise CheckFailed(f"{what}[{n!r}] has shape {tuple(got[n].shape)}, expected "
                                  f"{tuple(expected[n].shape)}: keep each parameter's shape.")
        assert_close(got[n].float() if got[n].dtype == torch.bool else got[n],
                     expected[n].float() if expected[n].dtype == torch.bool else expected[n],
                     f"{what}[{n!r}]", hint, atol=1e-6)


def check_graft(graft: Callable) -> None:
    """``graft(theta_pre, delta, gamma)`` must return θ_pre + γ ⊙ δ, with γ = 0 for names missing from gamma."""
    pre, delta = _params(0), _params(1)
    names = list(pre)
    ones = {n: torch.ones_like(t, dtype=torch.bool) for n, t in pre.items()}
    zeros = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in pre.items()}
    got = _call(graft, pre, delta, zeros)
    _compare(got, pre, "graft with γ = 0", "With γ = 0 nothing is grafted: every entry must equal θ_pre.")
    got = _call(graft, pre, delta, ones)
    _compare(got, ref.graft(pre, delta, ones), "graft with γ = 1",
             "With γ = 1 the result is the fine-tuned model θ_pre + δ (is δ added to θ_pre, not used alone?).")
    mask = ref.random_mask(pre, 7, seed=3)
    _compare(_call(graft, pre, delta, mask), ref.graft(pre, delta, mask), "graft with a boolean mask",
             "Entries where γ is True take θ_pre + δ, the others θ_pre; is γ applied the right way round?")
    soft = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(5)) for n, t in pre.items()}
    _compare(_call(graft, pre, delta, soft), ref.graft(pre, delta, soft), "graft with a real-valued γ",
             "For γ in [0, 1] the graft interpolates: θ_pre + γ ⊙ δ (convert a boolean γ to float first).")
    partial = {names[0]: mask[names[0]]}
    _compare(_call(graft, pre, delta, partial), ref.graft(pre, delta, partial), "graft with names missing from γ",
             "A name missing from gamma means γ = 0 there: return θ_pre for it.")
    passed("graft")


def check_base_patch(base_patch: Callable) -> None:
    """``base_patch(delta, k)`` must select the k entries of largest |δ| across all tensors together."""
    delta = _params(2)
    delta["layer.1.w"] = delta["layer.1.w"] * 3  # the largest changes sit in one tensor
    total = ref.n_params(delta)
    for k in (1, 5, 12, total):
        got = _call(base_patch, delta, k)
        size = sum(int(t.count_nonzero()) for t in got.values()) if isinstance(got, dict) else None
        if size != k:
            raise CheckFailed(f"base_patch(delta, k={k}) selected {size} entries, expected exactly {k}. Rank all "
                              f"entries of all tensors together (flatten and concatenate) and keep the top k.")
        expected = ref.base_patch(delta, k)
        _compare(got, expected, f"base_patch(k={k})",
                 "The base patch ranks by |δ| (the absolute change, not the signed change) over all tensors at "
                 "once, not k per tensor.")
    passed("base_patch")


def check_binarize_topk(binarize_topk: Callable) -> None:
    """``binarize_topk(scores, k)`` must return exactly k True entries, the k largest scores overall."""
    scores = _params(4)
    for k in (0, 3, 10, ref.n_params(scores)):
        got = _call(binarize_topk, scores, k)
        _compare(got, ref.binarize_topk(scores, k), f"binarize_topk(k={k})",
                 "Keep the k largest scores (signed: a large negative S means 'leave out') across all tensors "
                 "together; torch.topk on the concatenated, flattened scores does it.")
    tied = {"layer.0.w": torch.zeros(4, 3), "layer.0.b": torch.ones(4)}
    got = _call(binarize_topk, tied, 6)
    size = sum(int(t.count_nonzero()) for t in got.values())
    if size != 6:
        raise CheckFailed(f"With tied scores binarize_topk(k=6) selected {size} entries. Comparing with the "
                          f"k-th value (>=) keeps every tie; select indices (torch.topk) to get exactly k.")
    passed("binarize_topk")


def check_lesion(lesion: Callable) -> None:
    """``lesion(theta, reference, region)`` must reset the entries inside region to the reference values."""
    theta, reference = _params(6), _params(7)
    region = ref.random_mask(theta, 9, seed=1)
    _compare(_call(lesion, theta, reference, region), ref.lesion(theta, reference, region), "lesion",
             "Inside the region take the reference (e.g. pretrained) values; outside keep theta. Is the mask "
             "the right way round?")
    partial = {"layer.0.b": region["layer.0.b"]}
    _compare(_call(lesion, theta, reference, partial), ref.lesion(theta, reference, partial),
             "lesion with names missing from region",
             "A name missing from region is not lesioned: keep theta's values for it.")
    passed("lesion")


def check_layer_budget_patch(layer_budget_patch: Callable) -> None:
    """``layer_budget_patch(delta, k)`` must select exactly k entries, ``k // n_layers`` per layer (one more in the
    first ``k % n_layers`` layers), and inside each layer the entries of largest |δ| over its tensors together."""
    g = torch.Generator().manual_seed(11)
    shapes = {"layer.0.w": (4, 3), "layer.0.b": (4,), "layer.1.w": (3, 5), "layer.2.w": (2, 6), "layer.2.b": (6,)}
    delta = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    delta["layer.2.w"] = delta["layer.2.w"] * 10  # the largest changes all sit in one layer
    for k in (0, 1, 3, 8, 20):
        got = _call(layer_budget_patch, delta, k)
        size = sum(int(t.count_nonzero()) for t in got.values())
        if size != k:
            raise CheckFailed(f"layer_budget_patch(delta, k={k}) selected {size} entries, expected exactly {k} in "
                              f"total (not k per layer).")
        expected = ref.layer_budget_patch(delta, k)
        for layer in (0, 1, 2):
            names = [n for n in delta if ref.param_layer(n) == layer]
            want = sum(int(expected[n].count_nonzero()) for n in names)
            have = sum(int(got[n].count_nonzero()) for n in names if n in got)
            if have != want:
                raise CheckFailed(f"With k={k} over 3 layers, layer {layer} got {have} entries, expected {want}: "
                                  f"give each layer k // 3 entries and the remainder, one each, to the first "
                                  f"layers. (Ranking all layers together is the base patch, not a per-layer "
                                  f"budget.)")
        _compare(got, expected, f"layer_budget_patch(k={k})",
                 "Inside each layer rank by |δ| (the absolute change) over all of that layer's tensors together "
                 "(weights and biases), not a budget per tensor.")
    passed("layer_budget_patch")

"""Checks for the toy memory notebook's exercises (``notebooks/toy_memory.ipynb``).

Each check runs the reader's write rule and the library's (:mod:`engram_helpers.toy_memory`) on the same
small seeded memories and raises :class:`~engram_helpers.checks.CheckFailed` with a hint about the likely
mistake.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import toy_memory as tm
from . import CheckFailed, assert_close, passed


def _cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W [d, d], k [d], v [d], C [d, d]) for d = 2 and 4, seeded, with keys of length ≠ 1."""
    cases = []
    for d, seed in ((2, 0), (4, 1)):
        mem = tm.make_memory(d=d, spread=(1.0, 0.5, 0.25), seed=seed)
        gen = torch.Generator().manual_seed(10 + seed)
        k = 1.7 * torch.randn(d, generator=gen, dtype=torch.float64)
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        cases.append((mem.W, k, v, mem.C))
    return cases


def _diagnose(got: torch.Tensor, W, k, v, C, hints: dict[str, torch.Tensor]) -> str:
    for hint, wrong in hints.items():
        if isinstance(got, torch.Tensor) and got.shape == wrong.shape and torch.allclose(got.double(), wrong):
            return hint
    return ""


def check_delta_update(fn: Callable) -> None:
    """Check ``fn(W, k, v) -> ΔW [d_v, d_k]`` against :func:`toy_memory.delta_update`."""
    for W, k, v, _ in _cases():
        got = fn(W.clone(), k.clone(), v.clone())
        hints = {
            "You wrote Hebb's v kᵀ/(kᵀk): the delta rule writes the *error* (v − W k), not v.":
                torch.outer(v, k) / (k @ k),
            "Divide by kᵀk (the squared length of the key), so that the new key recalls v exactly.":
                torch.outer(v - W @ k, k),
            "Divide by kᵀk, not by ‖k‖: only then does (W + ΔW) k equal v.":
                torch.outer(v - W @ k, k) / k.norm(),
            "The outer product is (error) kᵀ, a [d_v, d_k] matrix: you have the transpose.":
                torch.outer(k, v - W @ k) / (k @ k),
            "You returned W + ΔW; return the change ΔW only.": W + torch.outer(v - W @ k, k) / (k @ k),
        }
        expected = tm.delta_update(W, k, v)
        assert_close(got, expected, "ΔW of the delta rule", _diagnose(got, W, k, v, None, hints))
    passed("delta_update")


def check_whitened_update(fn: Callable) -> None:
    """Check ``fn(W, k, v, C) -> ΔW [d_v, d_k]`` against :func:`toy_memory.whitened_update`."""
    for W, k, v, C in _cases():
        got = fn(W.clone(), k.clone(), v.clone(), C.clone())
        c_inv_k = torch.linalg.solve(C, k)
        hints = {
            "This is the plain delta rule: the direction must be C⁻¹k, and the denominator kᵀC⁻¹k.":
                tm.delta_update(W, k, v),
            "You multiplied by C instead of C⁻¹ (use torch.linalg.solve(C, k)).":
                torch.outer(v - W @ k, C @ k) / (k @ C @ k),
            "The denominator is kᵀC⁻¹k, not kᵀk: with kᵀk the new key does not recall v exactly.":
                torch.outer(v - W @ k, c_inv_k) / (k @ k),
            "The numerator is the error (v − W k), not v (that would keep the old recall, as Hebb does).":
                torch.outer(v, c_inv_k) / (k @ c_inv_k),
            "You returned W + ΔW; return the change ΔW only.": W + torch.outer(v - W @ k, c_inv_k) / (k @ c_inv_k),
        }
        expected = tm.whitened_update(W, k, v, C)
        assert_close(got, expected, "ΔW of the whitened rule", _diagnose(got, W, k, v, C, hints))
        if not torch.allclose((W + got.double()) @ k, v, atol=1e-8):
            raise CheckFailed("After your update the new key does not recall v exactly.")
    passed("whitened_update")

"""Checks for the consolidation notebook's exercises (``notebooks/consolidation.ipynb``).

Each check runs the reader's function and the library's reference (:mod:`engram_helpers.memit`) on the
same small random inputs (seeded) and raises :class:`~engram_helpers.checks.CheckFailed` with a hint
about the likely mistake. No model is needed.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import memit
from . import CheckFailed, assert_close, passed


def _problem(seed: int = 0, n: int = 3, d_out: int = 5, d_in: int = 8):
    """W-free MEMIT inputs: keys [n, d_in], residuals [n, d_out], an SPD C [d_in, d_in] (float64)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    return K, R, A @ A.T / (3 * d_in)


def _call(fn: Callable, *args) -> torch.Tensor:
    got = fn(*args)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"Your function returned {type(got).__name__}; return a torch.Tensor.")
    return got.detach().double().cpu()


def check_batch_update(fn: Callable) -> None:
    """Check ``fn(keys [n, d_in], residuals [n, d_out], C [d_in, d_in], lam) -> ΔW [d_out, d_in]``."""
    for seed, n, lam in ((0, 3, 0.5), (1, 1, 2.0), (2, 6, 10.0)):
        K, R, C = _problem(seed, n)
        expected = memit.batch_update(K, R, C, lam).double()
        got = _call(fn, K.clone(), R.clone(), C.clone(), lam)
        if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            continue
        if got.shape == expected.T.shape:
            raise CheckFailed(f"ΔW has shape {tuple(got.shape)}, expected [d_out, d_in] = {tuple(expected.shape)}: "
                              f"ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ with R = residualsᵀ [d_out, n] and K = keysᵀ [d_in, n].")
        wrong = {
            "no_new_keys": R.T @ K @ torch.linalg.inv(lam * C),
            "no_lambda": R.T @ K @ torch.linalg.inv(C + K.T @ K),
            "no_C": R.T @ K @ torch.linalg.inv(lam * torch.eye(C.shape[0], dtype=C.dtype) + K.T @ K),
            "C_not_inverted": R.T @ K @ (lam * C + K.T @ K),
        }
        hints = {
            "no_new_keys": "You inverted λC alone. The new keys belong inside the inverse too: (λC + K Kᵀ)⁻¹; "
                           "without them the update over-writes when λ is small.",
            "no_lambda": "λ (mom2_update_weight) is missing: it multiplies C inside the inverse.",
            "no_C": "You used λ·I instead of λ·C: the key statistics C are what protect the other memories.",
            "C_not_inverted": "The bracket (λC + K Kᵀ) must be inverted (use torch.linalg.solve, not a product).",
        }
        for name, value in wrong.items():
            if got.shape == value.shape and torch.allclose(got, value, atol=1e-5, rtol=1e-4):
                raise CheckFailed(hints[name])
        assert_close(got, expected, f"batch_update(n={n}, λ={lam})",
                     "ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ where K = keys.T and R = residuals.T; compute in float64.")
    passed("batch_update")


def check_spread_residual(fn: Callable) -> None:
    """Check ``fn(z [n, d], current [n, d], index, n_layers) -> [n, d]``: layer ``index``'s share."""
    g = torch.Generator().manual_seed(0)
    z, h = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    L = 4
    got = [_call(fn, z.clone(), h.clone(), i, L) for i in range(L)]
    expected = [memit.spread_residual(z, h, i, L).double() for i in range(L)]
    if all(a.shape == b.shape and torch.allclose(a, b, atol=1e-8) for a, b in zip(got, expected)):
        passed("spread_residual")
        return
    wrong = {  # each a rule for all layers; recognised only if it matches at every index
        "over_L": lambda i: (z - h) / L,
        "whole": lambda i: z - h,
        "index_plus_one": lambda i: (z - h) / (i + 1),
        "sign": lambda i: (h - z) / (L - i),
    }
    hints = {
        "over_L": "Every layer took 1/L of the error. Each layer takes 1/(layers still to come) of what is "
                  "LEFT: (z − current) / (n_layers − index), so the last layer closes the gap.",
        "whole": "Each layer wrote the whole remaining error; divide by the number of layers still to come "
                 "(n_layers − index).",
        "index_plus_one": "You divided by index + 1: the first layer should take the smallest share "
                          "(1/n_layers) and the last layer all that is left.",
        "sign": "The sign is reversed: the residual is z − current (where we want to go minus where we are).",
    }
    for name, rule in wrong.items():
        if all(a.shape == rule(i).shape and torch.allclose(a, rule(i), atol=1e-8) for i, a in enumerate(got)):
            raise CheckFailed(hints[name])
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, f"spread_residual(index={i}, n_layers={L})", "(z − current) / (n_layers − index)")


def check_key_similarity(fn: Callable) -> None:
    """Check ``fn(keys [n, d_in], C [d_in, d_in]) -> [n, n]``: cosine similarity in the metric C⁻¹."""
    for seed in (0, 1):
        K, _, C = _problem(seed, n=4)
        expected = memit.key_similarity(K, C).double()
        got = _call(fn, K.clone(), C.clone())
        if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5):
            continue
        Kn = K / K.norm(dim=1, keepdim=True)
        G_C = K @ C @ K.T
        wrong = {
            "plain_cosine": Kn @ Kn.T,
            "metric_C": G_C / G_C.diagonal().sqrt()[:, None] / G_C.diagonal().sqrt()[None, :],
            "not_normalized": K @ torch.linalg.solve(C, K.T),
        }
        hints = {
            "plain_cosine": "This is the plain cosine. The update measures keys through C⁻¹: use k_iᵀ C⁻¹ k_j "
                            "(torch.linalg.solve(C, K.T)).",
            "metric_C": "You used C where C⁻¹ belongs: k_iᵀ C⁻¹ k_j, not k_iᵀ C k_j.",
            "not_normalized": "Normalize: divide entry (i, j) by √(k_iᵀC⁻¹k_i · k_jᵀC⁻¹k_j), so the diagonal is 1.",
        }
        for name, value in wrong.items():
            if got.shape == value.shape and torch.allclose(got, value, atol=1e-5):
                raise CheckFailed(hints[name])
        assert_close(got, expected, "key_similarity", "G = K C⁻¹ Kᵀ, then G_ij / √(G_ii G_jj).", atol=1e-5)
    passed("key_similarity")

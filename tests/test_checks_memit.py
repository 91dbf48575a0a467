"""engram_helpers.checks.memit: each check passes the reference and a hand-written solution, and fails
known-wrong implementations with the right hint."""

from __future__ import annotations

import pytest
import torch

from engram_helpers import memit
from engram_helpers.checks import CheckFailed
from engram_helpers.checks import memit as checks


def _mine_update(keys, residuals, C, lam):
    K, R = keys.T, residuals.T
    return R @ K.T @ torch.linalg.inv(lam * C + K @ K.T)


def test_batch_update_check_passes_reference_and_hand_written():
    checks.check_batch_update(memit.batch_update)
    checks.check_batch_update(_mine_update)


@pytest.mark.parametrize("wrong, hint", [
    (lambda K, R, C, lam: R.T @ K @ torch.linalg.inv(lam * C), "new keys"),
    (lambda K, R, C, lam: R.T @ K @ torch.linalg.inv(C + K.T @ K), "λ"),
    (lambda K, R, C, lam: R.T @ K @ torch.linalg.inv(lam * torch.eye(C.shape[0], dtype=C.dtype) + K.T @ K), "λ·I"),
    (lambda K, R, C, lam: R.T @ K @ (lam * C + K.T @ K), "inverted"),
    (lambda K, R, C, lam: _mine_update(K, R, C, lam).T, "shape"),
    (lambda K, R, C, lam: 2 * _mine_update(K, R, C, lam), "values differ"),
    (lambda K, R, C, lam: [0.0], "torch.Tensor"),
])
def test_batch_update_check_catches_mistakes(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.check_batch_update(wrong)


def test_spread_check_passes_reference_and_hand_written():
    checks.check_spread_residual(memit.spread_residual)
    checks.check_spread_residual(lambda z, h, i, L: (z - h) / (L - i))


@pytest.mark.parametrize("wrong, hint", [
    (lambda z, h, i, L: (z - h) / L, "LEFT"),
    (lambda z, h, i, L: z - h, "whole remaining error"),
    (lambda z, h, i, L: (z - h) / (i + 1), "index \\+ 1"),
    (lambda z, h, i, L: (h - z) / (L - i), "sign"),
    (lambda z, h, i, L: (z - h) / (L - i + 1), "values differ"),
])
def test_spread_check_catches_mistakes(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.check_spread_residual(wrong)


def test_similarity_check_passes_reference_and_hand_written():
    def mine(K, C):
        G = K @ torch.linalg.inv(C) @ K.T
        d = G.diagonal().sqrt()
        return G / torch.outer(d, d)

    checks.check_key_similarity(memit.key_similarity)
    checks.check_key_similarity(mine)


@pytest.mark.parametrize("wrong, hint", [
    (lambda K, C: (K / K.norm(dim=1, keepdim=True)) @ (K / K.norm(dim=1, keepdim=True)).T, "plain cosine"),
    (lambda K, C: (lambda G: G / torch.outer(G.diagonal().sqrt(), G.diagonal().sqrt()))(K @ C @ K.T), "C where"),
    (lambda K, C: K @ torch.linalg.solve(C, K.T), "Normalize"),
])
def test_similarity_check_catches_mistakes(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.check_key_similarity(wrong)


def test_key_similarity_is_one_on_the_diagonal_and_symmetric():
    g = torch.Generator().manual_seed(3)
    K = torch.randn(5, 7, generator=g)
    A = torch.randn(7, 20, generator=g)
    S = memit.key_similarity(K, A @ A.T / 20)
    assert torch.allclose(S.diagonal(), torch.ones(5), atol=1e-5)
    assert torch.allclose(S, S.T, atol=1e-6)
    with pytest.raises(ValueError, match="keys must be"):
        memit.key_similarity(K, torch.eye(3))

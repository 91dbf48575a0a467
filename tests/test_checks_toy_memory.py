"""engram_helpers.checks.toy_memory: each check passes the reference and fails known-wrong implementations."""

from __future__ import annotations

import pytest
import torch

from engram_helpers import toy_memory as tm
from engram_helpers.checks import CheckFailed
from engram_helpers.checks import toy_memory as checks


def test_checks_pass_the_reference_and_hand_written_solutions():
    checks.check_delta_update(tm.delta_update)
    checks.check_whitened_update(tm.whitened_update)
    checks.check_delta_update(lambda W, k, v: torch.outer(v - W @ k, k) / k.dot(k))
    checks.check_whitened_update(
        lambda W, k, v, C: torch.outer(v - W @ k, torch.linalg.inv(C) @ k) / (k @ torch.linalg.inv(C) @ k))


@pytest.mark.parametrize("wrong, hint", [
    (lambda W, k, v: torch.outer(v, k) / (k @ k), "Hebb"),
    (lambda W, k, v: torch.outer(v - W @ k, k), "Divide by kᵀk"),
    (lambda W, k, v: torch.outer(v - W @ k, k) / k.norm(), "not by ‖k‖"),
    (lambda W, k, v: torch.outer(k, v - W @ k) / (k @ k), "transpose"),
    (lambda W, k, v: W + torch.outer(v - W @ k, k) / (k @ k), "ΔW only"),
    (lambda W, k, v: (v - W @ k) / (k @ k), "shape"),
])
def test_delta_check_catches_mistakes(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.check_delta_update(wrong)


def _solve(C, k):
    return torch.linalg.solve(C, k)


@pytest.mark.parametrize("wrong, hint", [
    (lambda W, k, v, C: tm.delta_update(W, k, v), "plain delta rule"),
    (lambda W, k, v, C: torch.outer(v - W @ k, C @ k) / (k @ C @ k), "instead of C⁻¹"),
    (lambda W, k, v, C: torch.outer(v - W @ k, _solve(C, k)) / (k @ k), "denominator"),
    (lambda W, k, v, C: torch.outer(v, _solve(C, k)) / (k @ _solve(C, k)), "error"),
    (lambda W, k, v, C: 2 * tm.whitened_update(W, k, v, C), "values differ"),
])
def test_whitened_check_catches_mistakes(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.check_whitened_update(wrong)

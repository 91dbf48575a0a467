"""Checks for the notebooks' exercises.

Each ``check_*`` function runs the reader's implementation against the library's reference on small
inputs and raises :class:`CheckFailed` with a targeted hint (what differs, and the likely cause). One
submodule per method: ``checks.tracing``, ``checks.rome``, ``checks.grafting``, ``checks.forgetting``, and
``checks.toy_memory`` for the toy memory notebook.
"""

from __future__ import annotations

import torch


class CheckFailed(AssertionError):
    """The reader's implementation differs from the reference; the message says how and why."""


def passed(name: str) -> None:
    """Print the success line every check ends with."""
    print(f"✓ {name}: all checks passed")


def assert_close(got, expected, what: str, hint: str = "", atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise :class:`CheckFailed` unless ``got`` matches ``expected`` in type, shape and value."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(got).__name__}. {hint}".strip())
    if got.shape != expected.shape:
        raise CheckFailed(f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}. {hint}".strip())
    got_f, exp_f = got.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.allclose(got_f, exp_f, atol=atol, rtol=rtol):
        diff = (got_f - exp_f).abs()
        raise CheckFailed(
            f"{what}: values differ (largest difference {diff.max().item():.3g} at index "
            f"{tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])}). {hint}".strip()
        )

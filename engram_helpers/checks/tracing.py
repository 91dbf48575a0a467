"""Checks for the causal-tracing notebook's exercises (``notebooks/causal_tracing.ipynb``).

Each check calls the reader's function on small random inputs and compares it with the library's
reference in :mod:`engram_helpers.tracing`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import tracing
from . import CheckFailed, assert_close, passed


def _inputs(seed: int, batch: int = 3, seq: int = 7, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, d, generator=gen), torch.randn(seq, d, generator=gen)


def check_corrupt(corrupt: Callable) -> None:
    """``corrupt(embeds [batch, seq, d], span (start, end), noise [batch, end - start, d]) -> [batch, seq, d]``."""
    for seed, span in [(0, (2, 5)), (1, (1, 2)), (2, (3, 7))]:
        embeds, _ = _inputs(seed)
        gen = torch.Generator().manual_seed(100 + seed)
        noise = torch.randn(embeds.shape[0], span[1] - span[0], embeds.shape[2], generator=gen)
        before = embeds.clone()
        got = corrupt(embeds, span, noise)
        if not torch.equal(embeds, before):
            raise CheckFailed("corrupt changed its input in place: work on a copy (embeds.clone()), so that the "
                              "clean embeddings stay available.")
        expected = tracing.corrupt_embeddings(embeds, span, noise)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            start, end = span
            outside = torch.ones(embeds.shape[1], dtype=torch.bool)
            outside[start:end] = False
            if not torch.allclose(got[:, outside], embeds[:, outside]):
                raise CheckFailed(f"For span {span}, tokens outside positions {start}..{end - 1} changed. Only the "
                                  f"subject's tokens get noise; the span's end is exclusive, as in Python slices.")
            if torch.allclose(got, embeds):
                raise CheckFailed("The output equals the input: the noise was not added to the subject's tokens.")
            if torch.allclose(got[:, start:end], noise):
                raise CheckFailed("The subject's embeddings were replaced by the noise; add the noise to them.")
        assert_close(got, expected, f"corrupt(embeds, span={span}, noise)",
                     hint="Row i of noise goes to row i of embeds, token k of noise to position start + k.")
    passed("corrupt")


def check_restore(restore: Callable) -> None:
    """``restore(corrupted [batch, seq, d], clean [seq, d], position) -> [batch, seq, d]``: every row gets the
    clean state at ``position``."""
    for seed, position in [(0, 3), (1, 0), (2, 6)]:
        corrupted, clean = _inputs(seed)
        before = corrupted.clone()
        got = restore(corrupted, clean, position)
        if not torch.equal(corrupted, before):
            raise CheckFailed("restore changed the corrupted tensor in place: return a modified copy "
                              "(corrupted.clone()). A forward hook that edits in place can corrupt other readers.")
        rows = torch.arange(corrupted.shape[0])
        expected = tracing.restore_state(corrupted, clean, rows, torch.full_like(rows, position))
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if torch.allclose(got, clean.expand_as(got)):
                raise CheckFailed("Every position was restored. Restore only the one position, in every row.")
            if not torch.allclose(got[:, position], clean[position].expand(corrupted.shape[0], -1)):
                raise CheckFailed(f"At position {position} the output is not the clean state in every row. Copy "
                                  f"clean[position] into [:, position] (all rows of the batch).")
        assert_close(got, expected, f"restore(corrupted, clean, position={position})",
                     hint="Positions other than `position` must keep their corrupted values.")
    passed("restore")


def check_token_categories(categories: Callable) -> None:
    """``categories(span, n_tokens) -> {category: [positions]}`` with the keys of ``tracing.CATEGORIES``."""
    cases = [((2, 5), 9), ((1, 2), 4), ((4, 5), 6), ((1, 4), 4), ((3, 5), 8)]
    for span, n_tokens in cases:
        got = categories(span, n_tokens)
        expected = tracing.token_categories(span, n_tokens)
        if not isinstance(got, dict) or set(got) != set(expected):
            raise CheckFailed(f"Return a dict with exactly the keys {list(tracing.CATEGORIES)}; got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        for name in tracing.CATEGORIES:
            if [int(i) for i in got[name]] != expected[name]:
                raise CheckFailed(
                    f"For a subject at span {span} in {n_tokens} tokens, {name!r} should be {expected[name]}, got "
                    f"{list(got[name])}. The span's end is exclusive; the last token is n_tokens - 1; a "
                    f"category can be empty, and the first token after the subject can also be the last token."
                )
    passed("token categories")

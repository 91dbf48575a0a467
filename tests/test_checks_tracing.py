"""Each causal-tracing check passes the reference and fails known-wrong implementations."""

import pytest
import torch

from engram_helpers import tracing
from engram_helpers.checks import CheckFailed
from engram_helpers.checks.tracing import check_corrupt, check_restore, check_token_categories


def _corrupt_in_place(embeds, span, noise):
    embeds[:, span[0]:span[1]] += noise
    return embeds


def test_check_corrupt_accepts_reference():
    check_corrupt(tracing.corrupt_embeddings)


@pytest.mark.parametrize("wrong", [
    lambda e, s, n: e.clone(),                                             # no noise
    _corrupt_in_place,
    lambda e, s, n: torch.cat([e[:, :s[0]], n, e[:, s[1]:]], dim=1),       # replaces instead of adding
    lambda e, s, n: tracing.corrupt_embeddings(e, (s[0] + 1, s[1] + 1), n) if s[1] < e.shape[1] else e + 1,  # shifted
    lambda e, s, n: e + n.mean(dim=1, keepdim=True),                       # noise everywhere
    lambda e, s, n: tracing.corrupt_embeddings(e, s, n.flip(0)),           # noise rows mixed up
])
def test_check_corrupt_rejects_wrong(wrong):
    with pytest.raises(CheckFailed):
        check_corrupt(wrong)


def _restore_ref(corrupted, clean, position):
    rows = torch.arange(corrupted.shape[0])
    return tracing.restore_state(corrupted, clean, rows, torch.full_like(rows, position))


def _restore_in_place(corrupted, clean, position):
    corrupted[:, position] = clean[position]
    return corrupted


def test_check_restore_accepts_reference():
    check_restore(_restore_ref)


@pytest.mark.parametrize("wrong", [
    _restore_in_place,
    lambda c, k, p: k.expand_as(c).clone(),                                # restores every position
    lambda c, k, p: _restore_ref(c, k, max(p - 1, 0) if p else 1),        # off by one
    lambda c, k, p: torch.cat([k[None, :], c[1:]]),                        # first row gets the whole clean sequence
    lambda c, k, p: tracing.restore_state(c, k, torch.tensor([0]), torch.tensor([p])),  # first row only
])
def test_check_restore_rejects_wrong(wrong):
    with pytest.raises(CheckFailed):
        check_restore(wrong)


def test_check_token_categories_accepts_reference():
    check_token_categories(tracing.token_categories)


def _categories_end_inclusive(span, n):
    return tracing.token_categories((span[0], min(span[1] + 1, n)), n)


def _no_overlap(span, n):
    cats = tracing.token_categories(span, n)
    if cats["first subsequent token"] == cats["last token"]:
        cats["first subsequent token"] = []
    return cats


def _last_token_excluded_wrongly(span, n):
    cats = tracing.token_categories(span, n)
    cats["further tokens"] = list(range(span[1] + 1, n))
    return cats


@pytest.mark.parametrize("wrong", [
    _categories_end_inclusive,
    _no_overlap,
    _last_token_excluded_wrongly,
    lambda s, n: {k: v for k, v in tracing.token_categories(s, n).items() if k != "further tokens"},
    lambda s, n: [],
])
def test_check_token_categories_rejects_wrong(wrong):
    with pytest.raises(CheckFailed):
        check_token_categories(wrong)

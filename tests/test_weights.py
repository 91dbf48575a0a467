"""One way to change weights: add, set, lesion; stacking; exact undo; clear errors."""

import pytest
import torch

from engram_helpers import weights


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_add_set_and_lesion_undo_bit_for_bit(tiny_model):
    before = _snapshot(tiny_model)
    names = [n for n, p in tiny_model.named_parameters() if p.dim() == 2][:2]
    gen = torch.Generator().manual_seed(0)
    p0 = dict(tiny_model.named_parameters())[names[0]]
    delta = 1e-3 * torch.randn(p0.shape, generator=gen)
    h = weights.add(tiny_model, {names[0]: delta}, label="edit")
    assert torch.equal(dict(tiny_model.named_parameters())[names[0]], before[names[0]] + delta)
    h.undo()
    assert _same(tiny_model, before)

    value = torch.randn(p0.shape, generator=gen)
    with weights.set_values(tiny_model, {names[0]: value}):
        assert torch.equal(dict(tiny_model.named_parameters())[names[0]], value)
    assert _same(tiny_model, before)

    mask = {names[1]: torch.rand(dict(tiny_model.named_parameters())[names[1]].shape, generator=gen) < 0.3}
    with weights.zero_where(tiny_model, mask):
        p1 = dict(tiny_model.named_parameters())[names[1]]
        assert torch.all(p1[mask[names[1]]] == 0)
        assert torch.equal(p1[~mask[names[1]]], before[names[1]][~mask[names[1]]])
    assert _same(tiny_model, before)


def test_stacked_changes_undo_in_reverse_order(tiny_model):
    before = _snapshot(tiny_model)
    name = next(n for n, p in tiny_model.named_parameters() if p.dim() == 2)
    shape = before[name].shape
    first = weights.add(tiny_model, {name: torch.full(shape, 0.1)})
    second = weights.add(tiny_model, {name: torch.full(shape, 0.2)})
    with pytest.raises(RuntimeError, match="reverse order"):
        first.undo()
    assert weights.active_changes(tiny_model) == [first, second]
    second.undo()
    first.undo()
    first.undo()  # idempotent
    assert _same(tiny_model, before)
    weights.add(tiny_model, {name: torch.full(shape, 0.1)})
    weights.add(tiny_model, {name: torch.full(shape, 0.2)})
    assert weights.undo_all(tiny_model) == 2
    assert _same(tiny_model, before)


def test_bad_input_fails_clearly_and_leaves_the_model_unchanged(tiny_model):
    before = _snapshot(tiny_model)
    names = [n for n, p in tiny_model.named_parameters() if p.dim() == 2][:2]
    with pytest.raises(ValueError, match="no parameters"):
        weights.add(tiny_model, {"not.a.parameter": torch.zeros(1)})
    with pytest.raises(ValueError, match="Nothing to change"):
        weights.add(tiny_model, {})
    good = torch.zeros(before[names[0]].shape)
    with pytest.raises(RuntimeError):  # the second delta cannot be added: the first is rolled back
        weights.add(tiny_model, {names[0]: good + 1, names[1]: torch.zeros(3, 3, 3)})
    with pytest.raises(TypeError, match="boolean"):
        weights.zero_where(tiny_model, {names[0]: torch.zeros(before[names[0]].shape)})
    with pytest.raises(ValueError, match="shape"):
        weights.zero_where(tiny_model, {names[0]: torch.zeros(before[names[0]].shape[1], dtype=torch.bool)})
    assert _same(tiny_model, before)
    assert weights.active_changes(tiny_model) == []

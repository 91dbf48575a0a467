"""Change a model's weights and restore them exactly: one mechanism for edits, grafts and lesions.

Every method that changes parameters (a ROME or MEMIT edit, a graft, a lesion) goes through
:func:`change`, which keeps a copy of each parameter it touches and returns a :class:`WeightChange`.
``undo()`` copies the originals back, so the model is restored bit for bit::

    handle = add(model, {"model.layers.4.mlp.down_proj.weight": delta})   # W += ΔW
    ...
    handle.undo()                                                         # W exactly as before

    with zero_where(model, mask):                                         # a lesion, for one block
        ...

Changes stack: several may be active at once, and each is undone separately, but a change must be undone
before any earlier change to the same parameter (most recent first), as with a stack of edits.

A :data:`Mask` is a dictionary from parameter names (as in ``model.named_parameters()``) to boolean
tensors of the parameters' shapes; it serves grafting (which entries take fine-tuned values) and lesions
(which entries are silenced).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

Params = dict[str, torch.Tensor]
"""Parameter name → tensor (values, differences or scores), shapes as in ``model.named_parameters()``."""

Mask = dict[str, torch.Tensor]
"""Parameter name → boolean tensor of that parameter's shape."""

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, list[WeightChange]]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class WeightChange:
    """A change written into some of a model's parameters; :meth:`undo` restores them exactly.

    ``originals``: parameter name → copy of its value before the change; ``label``: what made the change
    (e.g. ``"rome"``); ``info``: anything the method wants to keep with it (keys, values, timings).
    """

    model: nn.Module
    originals: Params
    label: str = ""
    info: dict = field(default_factory=dict)
    active: bool = True

    @property
    def names(self) -> list[str]:
        """The parameters this change touched."""
        return list(self.originals)

    def undo(self) -> None:
        """Restore every touched parameter as it was before this change (bit for bit); idempotent.

        Raises RuntimeError if a later change to one of the same parameters is still active.
        """
        if not self.active:
            return
        stack = _ACTIVE.get(self.model, [])
        later = stack[stack.index(self) + 1:] if self in stack else []
        clash = sorted({n for h in later for n in h.originals if n in self.originals})
        if clash:
            raise RuntimeError(
                f"A later change to {clash} is still applied: undo changes in reverse order (most recent first), "
                f"or call weights.undo_all(model)."
            )
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)
        self.active = False
        if self in stack:
            stack.remove(self)

    def __enter__(self) -> "WeightChange":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _parameters(model: nn.Module, names) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"The model has no parameters {missing[:3]}{' ...' if len(missing) > 3 else ''}: use names from "
            f"model.named_parameters() (engram_helpers.models.arch(model) gives the module names)."
        )
    return {n: params[n] for n in names}


def change(model: nn.Module, update: dict[str, Callable[[torch.Tensor], torch.Tensor]], label: str = "",
           info: dict | None = None) -> WeightChange:
    """Replace each named parameter ``p`` by ``update[name](p)`` (a new tensor of the same shape).

    The originals are copied first; the returned :class:`WeightChange` restores them with ``undo()``.
    If any update fails, the parameters already changed are restored before the error is raised.
    """
    if not update:
        raise ValueError("Nothing to change: pass at least one parameter name.")
    params = _parameters(model, list(update))
    originals = {n: p.detach().clone() for n, p in params.items()}
    handle = WeightChange(model, originals, label, dict(info or {}))
    try:
        with torch.no_grad():
            for name, fn in update.items():
                p = params[name]
                new = fn(p.detach())
                if new.shape != p.shape:
                    raise ValueError(f"The new value of {name} has shape {tuple(new.shape)}, not {tuple(p.shape)}.")
                p.copy_(new.to(p.dtype).to(p.device))
    except Exception:
        with torch.no_grad():
            for name, original in originals.items():
                params[name].copy_(original)
        raise
    _ACTIVE.setdefault(model, []).append(handle)
    return handle


def add(model: nn.Module, deltas: Params, label: str = "", info: dict | None = None) -> WeightChange:
    """``p += deltas[name]`` for each named parameter (an edit's ΔW); shapes must match the parameters."""
    def plus(d: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda p: p + d.to(p.dtype).to(p.device)

    return change(model, {n: plus(d) for n, d in deltas.items()}, label, info)


def set_values(model: nn.Module, values: Params, label: str = "", info: dict | None = None) -> WeightChange:
    """``p = values[name]`` for each named parameter (e.g. the grafted parameters)."""
    def put(v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda p: v.to(p.dtype).to(p.device).clone()

    return change(model, {n: put(v) for n, v in values.items()}, label, info)


def zero_where(model: nn.Module, mask: Mask, value: float = 0.0, label: str = "lesion",
               info: dict | None = None) -> WeightChange:
    """Set the entries of each named parameter where ``mask`` is True to ``value`` (a lesion)."""
    def fill(name: str, m: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if m.dtype != torch.bool:
            raise TypeError(f"The mask of {name} must be boolean, got {m.dtype}: "
                            f"use (scores > 0) or a top-k selection.")

        def apply(p: torch.Tensor) -> torch.Tensor:
            if m.shape != p.shape:
                raise ValueError(f"The mask of {name} has shape {tuple(m.shape)}, "
                                 f"not the parameter's {tuple(p.shape)}.")
            return p.masked_fill(m.to(p.device), value)

        return apply

    return change(model, {n: fill(n, m) for n, m in mask.items()}, label, info)


def active_changes(model: nn.Module) -> list[WeightChange]:
    """The changes still applied to ``model``, oldest first."""
    return list(_ACTIVE.get(model, []))


def undo_all(model: nn.Module) -> int:
    """Undo every change still applied to ``model``, most recent first. Returns how many were undone."""
    stack = active_changes(model)
    for h in reversed(stack):
        h.undo()
    return len(stack)

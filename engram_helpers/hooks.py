"""Read and replace any module's output (or input) during a forward pass.

One small mechanism, in the spirit of baukit's ``nethook``, used by every method in the course::

    with trace(model, "model.layers.3.mlp") as t:
        model(**batch)
    t.output            # the MLP's output, [batch, seq, d_model]

    with trace(model, "model.layers.3.mlp", edit_output=lambda out: out * 0):
        model(**batch)  # the same forward pass with that MLP silenced

    with trace(model, "model.layers.3.mlp.down_proj", retain_input=True, stop=True) as t:
        model(**batch)  # stops as soon as that module has run: the layers above are not computed
    t.input             # the MLP keys of layer 3

    with replay(model, {"model.layers.0": recorded}):
        model(**batch)  # layer 0 does not run: it returns `recorded`, an output kept from an earlier pass

Modules that return tuples (attention in transformers 5 returns ``(output, weights)``) are handled: the
hook reads and edits the first element and passes the rest through unchanged. Hooks are always removed
when the ``with`` block ends, also on error. With ``stop=True`` the forward pass ends (by an exception
that the ``with`` block swallows) once the traced module, or for :func:`trace_many` every traced module,
has run; the model call then returns nothing. ``retain_grad=True`` keeps the output in the autograd graph
and calls ``retain_grad()`` on it, so ``t.output.grad`` is there after ``backward()``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

Edit = Callable[[torch.Tensor], torch.Tensor]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``model.named_modules()``), with a clear error if absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"The model has no module {name!r}. Use engram_helpers.models.arch(model) for this "
            f"architecture's module names."
        ) from None


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (``stop=True``); caught by :func:`trace`."""


class Trace:
    """What one hooked module saw in the last forward pass.

    ``output``: the module's (first) output tensor after any edit; ``input``: its first positional input
    after any edit (only with ``retain_input=True``). Both are ``None`` until a forward pass has run.
    """

    def __init__(self, name: str):
        self.name = name
        self.output: torch.Tensor | None = None
        self.input: torch.Tensor | None = None


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


@contextmanager
def trace(
    model: nn.Module,
    name: str,
    retain_output: bool = True,
    retain_input: bool = False,
    edit_output: Edit | None = None,
    edit_input: Edit | None = None,
    detach: bool = True,
    stop: bool = False,
    retain_grad: bool = False,
    _after: Callable[[str], None] | None = None,
) -> Iterator[Trace]:
    """Hook module ``name`` for the duration of the ``with`` block.

    ``edit_output(out) -> new_out`` replaces the module's output tensor; ``edit_input(x) -> new_x``
    replaces its first positional input. ``detach=False`` keeps retained tensors in the autograd graph.
    ``stop=True`` ends the forward pass right after this module; ``retain_grad=True`` keeps the output's
    gradient (implies ``detach=False``).
    """
    module = get_module(model, name)
    record = Trace(name)
    handles = []
    if retain_grad:
        detach = False
        retain_output = True

    if retain_input or edit_input is not None:
        def pre_hook(_module, args, kwargs):
            if not args:
                raise RuntimeError(f"Module {name!r} was called without a positional input to read or edit.")
            x = args[0]
            if edit_input is not None:
                x = edit_input(x)
                args = (x,) + tuple(args[1:])
            if retain_input:
                record.input = x.detach() if detach else x
            return args, kwargs

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def hook(_module, _args, output):
        out = _first(output)
        if edit_output is not None:
            out = edit_output(out)
            output = _replace_first(output, out)
        if retain_grad and out.requires_grad:
            out.retain_grad()
        if retain_output:
            record.output = out.detach() if detach else out
        if _after is not None:
            _after(name)
        if stop:
            raise StopForward(name)
        return output

    if retain_output or edit_output is not None or stop or _after is not None:
        handles.append(module.register_forward_hook(hook))

    try:
        yield record
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trace_many(
    model: nn.Module,
    names: list[str],
    retain_output: bool = True,
    retain_input: bool = False,
    edit_output: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    edit_input: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    detach: bool = True,
    stop: bool = False,
    retain_grad: bool = False,
) -> Iterator[dict[str, Trace]]:
    """:func:`trace` on several modules at once; the edit functions also receive the module name.

    ``stop=True`` ends the forward pass once every one of ``names`` has run (the layers above the last
    of them are not computed).
    """
    seen: set[str] = set()

    def after(n: str) -> None:
        seen.add(n)
        if stop and seen >= set(names):
            raise StopForward(n)

    with ExitStack() as stack:
        records = {}
        for n in names:
            eo = (lambda out, n=n: edit_output(out, n)) if edit_output is not None else None
            ei = (lambda x, n=n: edit_input(x, n)) if edit_input is not None else None
            records[n] = stack.enter_context(
                trace(model, n, retain_output=retain_output, retain_input=retain_input,
                      edit_output=eo, edit_input=ei, detach=detach, retain_grad=retain_grad,
                      _after=after if stop else None)
            )
        try:
            yield records
        except StopForward:
            pass


class _Replay(nn.Module):
    """Stands in for a module: returns a recorded output without computing anything."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.recorded = output

    def forward(self, *_args, **_kwargs) -> torch.Tensor:
        return self.recorded


@contextmanager
def replay(model: nn.Module, outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each module named in ``outputs`` does not run: it returns ``outputs[name]``.

    For modules whose output is one tensor and whose inputs are the same in every pass, e.g. the layers
    below a ROME edit: record their outputs once (``trace_many(..., stop=True)``), then replay them in
    every step instead of recomputing. The modules are put back when the block ends, also on error.
    """
    swapped = []
    try:
        for name, out in outputs.items():
            module = get_module(model, name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            parent._modules[child] = _Replay(out)
            swapped.append((parent, child, module))
        yield
    finally:
        for parent, child, module in reversed(swapped):
            parent._modules[child] = module


def replace_at(values: torch.Tensor, positions: torch.Tensor | list[int] | int,
               rows: slice | torch.Tensor = slice(None)) -> Edit:
    """An ``edit_output`` that writes ``values`` into the module output at token ``positions``.

    ``values`` is [n_positions, d] or [batch, n_positions, d] (broadcast over the batch rows selected by
    ``rows``). Returns a new tensor; the original output is not modified in place.
    """
    pos = torch.as_tensor(positions).reshape(-1)

    def edit(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        v = values.to(out.dtype).to(out.device)
        idx = pos.to(out.device)
        out[rows, idx] = v
        return out

    return edit

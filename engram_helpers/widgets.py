"""Interactive explorers for causal tracing and ROME, built from ipywidgets.

:func:`trace_explorer` picks a fact and a kind of state (residual stream, MLP, attention) and shows the
causal trace as a heatmap; :func:`edit_explorer` edits one fact with ROME, shows the top predictions on
the edited prompt and on test prompts before and after the edit, and undoes the edit exactly.

Both are ``VBox`` subclasses: display them as the last expression of a cell. The expensive work runs
only when a button is pressed, never on a keystroke. Errors appear as a message inside the widget, not
as a traceback. Results are written straight into the widgets' state (``Output.outputs``, ``HTML.value``),
so a notebook executed for the book stores a filled-in explorer with its widget state, and the static
page shows a heatmap and a table instead of an empty box.

The functions that do the work are parameters (``trace_fn``, ``edit_fn``, ``predict_fn``); the defaults
are :func:`engram_helpers.tracing.trace_fact`, :func:`engram_helpers.rome.apply_rome` and
:func:`engram_helpers.models.predict`.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable, Sequence

import ipywidgets as widgets
import torch

from .data import Fact
from .query import Query

TraceFn = Callable[..., Any]      # (model, tok, query, kind=..., **kw) -> result with .plot(ax)
EditFn = Callable[..., Any]       # (model, tok, query, **kw) -> weights.WeightChange (has .undo() and .info)
PredictFn = Callable[..., list]   # (model, tok, prompts, k=...) -> [[(token, prob), ...], ...]


def _wide() -> widgets.Layout:
    return widgets.Layout(width="100%", max_width="560px")


_LABEL = {"description_width": "90px"}

KINDS = {"layer": "residual stream", "mlp": "MLP output", "attn": "attention output"}
"""The kinds of state a causal trace restores, with the labels the explorer shows."""


# ----------------------------------------------------------------------------------------------------------
# Small rendering helpers (shared by both explorers).


def _message(text: str, error: bool = False) -> str:
    """HTML for a one-line status message (red for errors)."""
    colour = "#b00020" if error else "#333"
    return f'<span style="color:{colour}">{html.escape(text)}</span>'


def _error_message(err: BaseException) -> str:
    """A readable one-line message for an exception raised by a callback."""
    text = str(err).strip() or type(err).__name__
    return _message(f"{type(err).__name__}: {text}", error=True)


def figure_output(fig, alt: str = "figure") -> dict:
    """A notebook ``display_data`` output holding ``fig`` (a matplotlib Figure) as a PNG image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return {"output_type": "display_data", "data": {"image/png": data, "text/plain": f"<{alt}>"}, "metadata": {}}


def predictions_table(rows: Sequence[tuple[str, list, list | None]], k: int) -> str:
    """An HTML table of top-``k`` predictions: one row per ``(prompt, before, after)``.

    ``before`` and ``after`` are lists of ``(token, probability)``; ``after`` may be ``None`` (no edit).
    """
    def cell(preds: list | None) -> str:
        if preds is None:
            return "<td>–</td>"
        items = "<br>".join(f"<code>{html.escape(repr(t))}</code> {p:.2f}" for t, p in preds[:k])
        return f"<td>{items}</td>"

    head = "<tr><th>prompt</th><th>before edit</th><th>after edit</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(p)}</td>{cell(b)}{cell(a)}</tr>" for p, b, a in rows
    )
    style = "border-collapse:collapse;text-align:left"
    return f'<table style="{style}" cellpadding="4" border="1">{head}{body}</table>'


def weights_key(model) -> float | None:
    """A fingerprint of the model's weights (the sum of all parameters), so that cached traces of an
    unedited model are not shown after an edit. ``None`` for objects without parameters."""
    params = getattr(model, "parameters", None)
    if params is None:
        return None
    with torch.no_grad():
        return float(sum(p.detach().sum(dtype=torch.float64) for p in params()))


def trace_summary(result) -> str:
    """One sentence about a :class:`engram_helpers.tracing.TraceResult` (empty for other objects):
    the best restoration at a subject token, and the best anywhere."""
    try:
        start, end = result.subject_span
        sub = result.scores[start:end]
        i, layer = (int(x) for x in divmod(int(sub.argmax()), sub.shape[1]))
        token, layer_any = result.peak()
        return (f"p(answer): clean {result.clean_prob:.2f}, subject corrupted {result.corrupted_prob:.2f}. "
                f"Best restoration at a subject token: {result.tokens[start + i]!r}, layer {layer} "
                f"({float(sub[i, layer]):.2f}); anywhere: {result.tokens[token]!r}, "
                f"layer {layer_any} ({float(result.scores[token, layer_any]):.2f}).")
    except (AttributeError, TypeError, IndexError, ValueError):
        return ""


def edit_summary(handle) -> str:
    """One sentence about a ROME edit's :class:`engram_helpers.weights.WeightChange` (empty for other objects)."""
    parts = []
    info = getattr(handle, "info", None)
    info = info if isinstance(info, dict) else {}
    if isinstance(info.get("layer"), int):
        parts.append(f"MLP of layer {info['layer']} edited")
    p_new = info.get("p_new")
    if isinstance(p_new, float):
        parts.append(f"p(new object) at the end of the value optimization: {p_new:.2f}")
    return ("; ".join(parts) + ".") if parts else ""


# ----------------------------------------------------------------------------------------------------------
# Trace explorer.


class TraceExplorer(widgets.VBox):
    """Choose a fact and a kind; press *Trace* to see the causal-tracing heatmap.

    Children: ``fact`` (Dropdown of fact indices), ``kind`` (Dropdown), ``button``, ``status`` (HTML),
    ``figure`` (Output holding the heatmap as a PNG). Results are cached per (fact, kind, weights), so a
    trace after an edit (e.g. from :func:`edit_explorer` on the same model) traces the edited model.
    """

    def __init__(self, model, tok, facts: Sequence[Fact], trace_fn: TraceFn, kinds: Sequence[str] = tuple(KINDS),
                 trace_kwargs: dict | None = None, initial: bool = True):
        if not facts:
            raise ValueError("trace_explorer needs at least one fact: pass e.g. data.known_facts(model, tok).")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"Unknown kinds {unknown or list(kinds)}: choose from {list(KINDS)}.")
        self.model, self.tok, self.facts = model, tok, list(facts)
        self.trace_fn, self.trace_kwargs = trace_fn, dict(trace_kwargs or {})
        self.cache: dict[tuple[int, str, float | None], Any] = {}
        self.fact = widgets.Dropdown(
            options=[(f"{f.prompt} … {f.target_true}", i) for i, f in enumerate(self.facts)],
            value=0, description="Fact", layout=_wide(), style=_LABEL,
        )
        self.kind = widgets.Dropdown(options=[(KINDS[k], k) for k in kinds], value=kinds[0], description="Restore",
                                     style=_LABEL)
        self.button = widgets.Button(description="Trace", button_style="primary", icon="play")
        self.status = widgets.HTML(_message("Choose a fact and a kind, then press Trace."))
        self.figure = widgets.Output(layout=widgets.Layout(min_height="200px"))
        self.button.on_click(self._on_click)
        super().__init__([self.fact, widgets.HBox([self.kind, self.button]), self.status, self.figure])
        if initial:
            self.run()

    def _on_click(self, _button=None) -> None:
        self.run()

    def run(self) -> Any:
        """Trace the selected fact and kind (or take it from the cache) and show the heatmap.

        Returns the trace result, or ``None`` if the trace failed (the message is shown in ``status``).
        """
        from matplotlib.figure import Figure

        fact, kind = self.facts[self.fact.value], self.kind.value
        key = (self.fact.value, kind, weights_key(self.model))
        self.button.disabled = True
        self.status.value = _message(f"Tracing '{fact.prompt}' ({KINDS[kind]})…")
        try:
            if key not in self.cache:
                self.cache[key] = self.trace_fn(self.model, self.tok, fact.query(), kind=kind, **self.trace_kwargs)
            result = self.cache[key]
            n_rows = len(getattr(result, "tokens", ()) or ())
            fig = Figure(figsize=(6.4, max(3.0, 0.32 * n_rows + 1.4)))
            result.plot(ax=fig.add_subplot())
            self.figure.outputs = (figure_output(fig, f"causal trace: {fact.prompt} ({kind})"),)
        except Exception as err:  # shown in the widget: a reader's typo must not end in a traceback
            self.status.value = _error_message(err)
            return None
        finally:
            self.button.disabled = False
        self.status.value = _message(f"Causal trace of '{fact.prompt}' → '{fact.target_true}', restoring the "
                                     f"{KINDS[kind]}. {trace_summary(result)}")
        return result


def trace_explorer(model, tok, facts: Sequence[Fact], kinds: Sequence[str] = tuple(KINDS),
                   trace_fn: TraceFn | None = None, initial: bool = True, **trace_kwargs) -> TraceExplorer:
    """A widget to choose a fact and a kind (``"layer"``, ``"mlp"``, ``"attn"``) and see its causal trace.

    ``trace_kwargs`` go to ``trace_fn`` (default :func:`engram_helpers.tracing.trace_fact`), e.g. the number
    of noise samples. With ``initial=True`` the first fact is traced at once, so that the widget is never
    empty (also in the static book).
    """
    if trace_fn is None:
        from .tracing import trace_fact
        trace_fn = trace_fact
    return TraceExplorer(model, tok, facts, trace_fn, kinds=kinds, trace_kwargs=trace_kwargs, initial=initial)


# ----------------------------------------------------------------------------------------------------------
# Edit explorer.


class EditExplorer(widgets.VBox):
    """Type a subject, a prompt that contains it and a new object; *Apply edit*, compare, *Undo*.

    Children: ``subject``, ``prompt``, ``target`` (Text), ``tests`` (Textarea, one test prompt per line),
    ``apply_button``, ``undo_button``, ``status`` (HTML), ``table`` (HTML with the predictions).
    ``handles`` is the stack of applied edits; *Undo* reverts the latest one.
    """

    def __init__(self, model, tok, edit_fn: EditFn, predict_fn: PredictFn, subject: str = "", prompt: str = "",
                 target_new: str = "", tests: Sequence[str] = (), k: int = 3, edit_kwargs: dict | None = None):
        self.model, self.tok, self.k = model, tok, k
        self.edit_fn, self.predict_fn, self.edit_kwargs = edit_fn, predict_fn, dict(edit_kwargs or {})
        self.handles: list[Any] = []
        self.subject = widgets.Text(value=subject, description="Subject", placeholder="e.g. Paris",
                                    layout=_wide(), style=_LABEL)
        self.prompt = widgets.Text(value=prompt, description="Prompt", placeholder="e.g. Paris is the capital of",
                                   layout=_wide(), style=_LABEL)
        self.target = widgets.Text(value=target_new, description="New object", placeholder="e.g. Italy",
                                   layout=_wide(), style=_LABEL)
        self.tests = widgets.Textarea(value="\n".join(tests), description="Test prompts",
                                      placeholder="one prompt per line: a paraphrase, a neighbour",
                                      layout=widgets.Layout(width="100%", max_width="560px", height="70px"),
                                      style=_LABEL)
        self.apply_button = widgets.Button(description="Apply edit", button_style="primary", icon="pencil")
        self.undo_button = widgets.Button(description="Undo", icon="undo", disabled=True)
        self.status = widgets.HTML(_message("Type an edit and press Apply edit."))
        self.table = widgets.HTML()
        self.apply_button.on_click(lambda _b: self.apply())
        self.undo_button.on_click(lambda _b: self.undo())
        super().__init__([self.subject, self.prompt, self.target, self.tests,
                          widgets.HBox([self.apply_button, self.undo_button]), self.status, self.table])

    def _prompts(self) -> list[str]:
        prompt = self.prompt.value.strip()
        return [prompt] + [line.strip() for line in self.tests.value.splitlines() if line.strip()]

    def _validate(self) -> tuple[str, str, str]:
        subject, prompt, target = self.subject.value.strip(), self.prompt.value.strip(), self.target.value.strip()
        if not subject:
            raise ValueError("The subject is empty: type the entity whose fact you edit, e.g. 'Paris'.")
        if not prompt:
            raise ValueError("The prompt is empty: type a sentence that starts the fact, e.g. "
                             "'Paris is the capital of'.")
        if subject not in prompt and "{}" not in prompt:
            raise ValueError(f"The subject '{subject}' does not appear in the prompt '{prompt}': "
                             "write the subject into the prompt exactly as typed above.")
        if not target:
            raise ValueError("The new object is empty: type what the prompt should now lead to, e.g. 'Italy'.")
        return subject, prompt, target

    def query(self) -> Query:
        """The typed edit request as a :class:`~engram_helpers.query.Query`: the subject's first occurrence in
        the prompt becomes the template's ``{}`` (type ``{}`` in the prompt yourself to choose another)."""
        subject, prompt, target = self._validate()
        template = prompt if "{}" in prompt else prompt.replace(subject, "{}", 1)
        return Query(template, subject, target)

    def show_predictions(self, after: bool = False, before: list | None = None) -> list:
        """Fill the table with the current top-``k`` predictions for the prompt and the test prompts.

        With ``after=True`` they go into the *after edit* column next to ``before``. Returns them.
        """
        prompts = self._prompts()
        preds = self.predict_fn(self.model, self.tok, prompts, k=self.k)
        if after:
            assert before is not None, "after=True needs the predictions from before the edit"
            rows = list(zip(prompts, before, preds))
        else:
            rows = [(p, b, None) for p, b in zip(prompts, preds)]
        self.table.value = predictions_table(rows, self.k)
        return preds

    def preview(self) -> None:
        """Show the unedited model's predictions (an initial state that changes nothing)."""
        try:
            if not self.prompt.value.strip():
                raise ValueError("The prompt is empty: type a sentence that starts the fact.")
            self.show_predictions()
        except Exception as err:
            self.status.value = _error_message(err)

    def apply(self) -> Any:
        """Apply the typed edit; show predictions before and after. Returns the handle, or ``None`` on error."""
        self.apply_button.disabled = True
        try:
            _, prompt, target = self._validate()
            self.status.value = _message(f"Editing: '{prompt}' → '{target}'…")
            before = self.predict_fn(self.model, self.tok, self._prompts(), k=self.k)
            handle = self.edit_fn(self.model, self.tok, self.query(), **self.edit_kwargs)
            self.handles.append(handle)
            self.show_predictions(after=True, before=before)
        except Exception as err:
            self.status.value = _error_message(err)
            return None
        finally:
            self.apply_button.disabled = False
            self.undo_button.disabled = not self.handles
        self.status.value = _message(f"Edited: '{prompt}' → '{target}' ({len(self.handles)} edit(s) applied; "
                                     f"Undo restores the weights). {edit_summary(handle)}")
        return handle

    def undo(self) -> bool:
        """Revert the latest edit exactly and show the restored predictions. Returns whether one was undone."""
        if not self.handles:
            self.status.value = _message("There is no edit to undo.", error=True)
            return False
        try:
            self.handles[-1].undo()
            self.handles.pop()
            self.show_predictions()
        except Exception as err:
            self.status.value = _error_message(err)
            return False
        finally:
            self.undo_button.disabled = not self.handles
        self.status.value = _message(f"Undone: the weights are restored ({len(self.handles)} edit(s) still applied).")
        return True


def edit_explorer(model, tok, fact: Fact | None = None, subject: str = "", prompt: str = "", target_new: str = "",
                  tests: Sequence[str] | None = None, k: int = 3, apply_initial: bool = False,
                  edit_fn: EditFn | None = None, predict_fn: PredictFn | None = None,
                  **edit_kwargs) -> EditExplorer:
    """A widget to edit a fact with ROME, compare top-``k`` predictions before and after, and undo.

    The fields start from ``fact`` (its prompt, subject, counterfactual object, first paraphrase and first
    neighbourhood prompt) unless given explicitly. ``edit_kwargs`` go to ``edit_fn`` (default
    :func:`engram_helpers.rome.apply_rome`, e.g. ``hparams=rome.with_settings(hp, layer=4)`` or ``C=``). With
    ``apply_initial=True`` the starting edit is applied at once (the model stays edited until *Undo*);
    otherwise the unedited predictions are shown.
    """
    if edit_fn is None:
        from .rome import apply_rome
        edit_fn = apply_rome
    if predict_fn is None:
        from .models import predict
        predict_fn = predict
    if fact is not None:
        subject = subject or fact.subject
        prompt = prompt or fact.prompt
        target_new = target_new or fact.target_new
        if tests is None:
            tests = list(fact.paraphrases[:1]) + list(fact.neighbourhood[:1])
    explorer = EditExplorer(model, tok, edit_fn, predict_fn, subject=subject, prompt=prompt,
                            target_new=target_new, tests=tests or (), k=k, edit_kwargs=edit_kwargs)
    if apply_initial:
        explorer.apply()
    else:
        explorer.preview()
    return explorer

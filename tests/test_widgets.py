"""The explorers' callbacks: button clicks, caching, readable errors, stored state, exact undo."""

from __future__ import annotations

import base64

import pytest
import torch
from ipywidgets.embed import embed_data

from engram_helpers import widgets as ew
from engram_helpers.data import load_facts
from engram_helpers.models import first_token_id, load_model, mlp_out_weight, next_token_probs, predict


class StandInTrace:
    """Stands in for tracing.TraceResult: something with .plot(ax)."""

    def __init__(self, prompt: str, kind: str):
        self.prompt, self.kind = prompt, kind

    def plot(self, ax=None):
        ax.imshow(torch.arange(12.0).reshape(3, 4).numpy())
        ax.set_title(f"{self.kind}: {self.prompt}")
        return ax


class Recorder:
    """A stand-in trace function that records its calls."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.fail = fail

    def __call__(self, model, tok, query, kind="layer", **kw):
        self.calls.append((query.prompt, query.subject, query.target, kind, kw))
        if self.fail is not None:
            raise self.fail
        return StandInTrace(query.prompt, kind)


@pytest.fixture(scope="module")
def facts():
    return load_facts()[:4]


def _png(output: dict) -> bytes:
    return base64.b64decode(output["data"]["image/png"])


def test_trace_explorer_shows_first_fact_at_once(facts):
    rec = Recorder()
    ex = ew.trace_explorer(None, None, facts, trace_fn=rec, n_samples=3)
    assert rec.calls == [(facts[0].prompt, facts[0].subject, facts[0].target_true, "layer", {"n_samples": 3})]
    assert len(ex.figure.outputs) == 1
    assert _png(ex.figure.outputs[0]).startswith(b"\x89PNG")
    assert facts[0].prompt in ex.status.value


def test_trace_explorer_button_traces_selection_and_caches(facts):
    rec = Recorder()
    ex = ew.trace_explorer(None, None, facts, trace_fn=rec, initial=False)
    assert rec.calls == [] and ex.figure.outputs == ()
    ex.fact.value, ex.kind.value = 2, "mlp"
    ex.button.click()
    assert rec.calls[-1][:4] == (facts[2].prompt, facts[2].subject, facts[2].target_true, "mlp")
    first = ex.figure.outputs
    ex.kind.value = "attn"
    ex.button.click()
    assert rec.calls[-1][3] == "attn" and ex.figure.outputs != first
    ex.kind.value = "mlp"
    ex.button.click()  # cached: no new trace, same picture as before
    assert len(rec.calls) == 2
    assert ex.figure.outputs == first
    assert not ex.button.disabled


def test_trace_explorer_shows_errors_as_text(facts):
    ex = ew.trace_explorer(None, None, facts, trace_fn=Recorder(fail=ValueError("subject not found")))
    assert "ValueError" in ex.status.value and "subject not found" in ex.status.value
    assert ex.figure.outputs == ()
    assert not ex.button.disabled


def test_trace_explorer_rejects_bad_arguments(facts):
    with pytest.raises(ValueError, match="at least one fact"):
        ew.trace_explorer(None, None, [], trace_fn=Recorder())
    with pytest.raises(ValueError, match="choose from"):
        ew.trace_explorer(None, None, facts, kinds=("mlp", "residual"), trace_fn=Recorder())


def test_trace_explorer_state_is_stored_for_the_static_book(facts):
    """What nbclient saves with the notebook (the widget state) holds the heatmap image."""
    ex = ew.trace_explorer(None, None, facts, trace_fn=Recorder())
    state = embed_data(views=[ex])["manager_state"]["state"]
    stored = [o.get("data", {}).get("image/png") for m in state.values() if m["model_name"] == "OutputModel"
              for o in m["state"]["outputs"]]
    image = ex.figure.outputs[0]["data"]["image/png"]
    assert image and image in stored, "the heatmap shown by the explorer is not in the saved widget state"


# ------------------------------------------------------------------------------------------------------------
# Edit explorer.


class StandInHandle:
    def __init__(self, restore):
        self.restore = restore
        self.undone = False

    def undo(self):
        self.restore()
        self.undone = True


def fake_predict(model, tok, prompts, k=3):
    return [[(" Paris", 0.5), (" Rome", 0.25), (" the", 0.125)][:k] for _ in prompts]


def test_edit_explorer_refuses_bad_input_with_a_message(facts):
    calls = []
    ex = ew.edit_explorer(None, None, facts[0], edit_fn=lambda *a, **k: calls.append(a),
                          predict_fn=fake_predict)
    assert "<table" in ex.table.value and "before edit" in ex.table.value  # initial state: unedited predictions
    ex.subject.value = "Atlantis"
    ex.apply_button.click()
    assert "does not appear in the prompt" in ex.status.value and calls == []
    ex.subject.value, ex.target.value = facts[0].subject, "   "
    ex.apply_button.click()
    assert "new object is empty" in ex.status.value and calls == []
    assert ex.undo_button.disabled and not ex.apply_button.disabled
    ex.undo_button.click()
    assert "no edit to undo" in ex.status.value


def test_edit_explorer_builds_the_query_from_the_typed_fields(facts):
    seen = []
    ex = ew.edit_explorer(None, None, facts[0], edit_fn=lambda m, t, q, **k: seen.append(q),
                          predict_fn=fake_predict)
    ex.apply_button.click()
    q = seen[-1]
    assert (q.template, q.subject, q.target) == (facts[0].template, facts[0].subject, facts[0].target_new)
    ex.prompt.value, ex.subject.value, ex.target.value = "Paris likes Paris and {} too", "Paris", "Rome"
    assert ex.query().template == "Paris likes Paris and {} too"  # a typed {} chooses the occurrence


def test_edit_explorer_shows_edit_function_errors(facts):
    def broken(*args, **kwargs):
        raise RuntimeError("covariance statistics missing")

    ex = ew.edit_explorer(None, None, facts[0], edit_fn=broken, predict_fn=fake_predict)
    ex.apply_button.click()
    assert "RuntimeError" in ex.status.value and "covariance" in ex.status.value
    assert ex.handles == [] and ex.undo_button.disabled


@pytest.fixture(scope="module")
def model_tok():
    torch.set_num_threads(1)
    return load_model()


def rank_one_edit(layer: int = 3):
    """A stand-in editor: a seeded rank-one update of one MLP output projection, undone from a copy."""

    def edit(model, tok, query, **kwargs):
        assert query.prompt and query.target, "the explorer passes a Query with the new object as its target"
        w = mlp_out_weight(model, layer)
        saved = w.detach().clone()
        g = torch.Generator().manual_seed(0)
        u, v = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
        with torch.no_grad():
            w += 0.5 * torch.outer(u, v)

        def restore():
            with torch.no_grad():
                w.copy_(saved)

        return StandInHandle(restore)

    return edit


def test_edit_explorer_apply_and_undo_on_the_real_model(model_tok, facts):
    model, tok = model_tok
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probs_before = next_token_probs(model, tok, facts[0].prompt)
    ex = ew.edit_explorer(model, tok, facts[0], edit_fn=rank_one_edit(), predict_fn=predict)
    assert ex.tests.value.splitlines() == [facts[0].paraphrases[0], facts[0].neighbourhood[0]]
    handle = ex.apply()
    assert handle is not None and ex.handles == [handle] and not ex.undo_button.disabled
    assert "after edit" in ex.table.value and "Edited" in ex.status.value
    assert not torch.equal(next_token_probs(model, tok, facts[0].prompt), probs_before), "the edit changed nothing"
    ex.apply_button.click()  # a second edit stacks on the first
    assert len(ex.handles) == 2
    ex.undo_button.click()
    ex.undo_button.click()
    assert handle.undone and ex.handles == [] and ex.undo_button.disabled
    assert "restored" in ex.status.value
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "undo did not restore the weights exactly"
    assert torch.equal(next_token_probs(model, tok, facts[0].prompt), probs_before)


@pytest.mark.slow  # 51 s measured with 1 thread on a busy machine
def test_explorers_with_the_library_functions(model_tok, facts):
    """The defaults: tracing.trace_fact draws the heatmap; rome.apply_rome edits and its handle undoes exactly."""
    model, tok = model_tok
    tracer = ew.trace_explorer(model, tok, facts[:1], n_samples=2)
    assert len(tracer.figure.outputs) == 1 and "Best restoration at a subject token" in tracer.status.value
    result = tracer.cache[(0, "layer", ew.weights_key(model))]
    assert result.scores.shape[0] == len(result.tokens) and result.n_samples == 2

    before = {k: v.clone() for k, v in model.state_dict().items()}
    key_before = ew.weights_key(model)
    fact = facts[0]
    editor = ew.edit_explorer(model, tok, fact, apply_initial=True)
    assert len(editor.handles) == 1, editor.status.value
    p = next_token_probs(model, tok, fact.prompt)[0]
    assert p[first_token_id(tok, fact.target_new)] > p[first_token_id(tok, fact.target_true)], \
        "the ROME edit did not make the new object more probable than the true one"
    assert ew.weights_key(model) != key_before, "the trace cache would not notice the edit"
    assert editor.undo()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "undo did not restore the weights exactly"
    assert ew.weights_key(model) == key_before

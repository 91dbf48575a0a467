"""Each causal-tracing check passes the reference and fails known-wrong implementations."""

import pytest
import torch

from engram_helpers import tracing
from engram_helpers.checks import CheckFailed
from engram_helpers.checks.tracing import (
    check_corrupt,
    check_replacement_traces,
    check_restore,
    check_token_categories,
)


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


# ------------------------------------------------------------------ ★★★ symmetric token replacement

@pytest.fixture(scope="module")
def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _landmarks():
    from engram_helpers.data import load_facts

    by_subject = {f.subject: f for f in load_facts()}
    # Eiffel Tower (Paris), Statue of Liberty (New York), Louvre (Paris): same relation
    return by_subject["Eiffel Tower"], by_subject["Statue of Liberty"], by_subject["Louvre"]


def _traces(model, tok, fact, *, kind="mlp", window=2, replace_with=None, label=None, n_samples=1):
    r = tracing.trace_fact(model, tok, fact.query(), kind=kind, window=window, n_samples=n_samples,
                           replace_with=replace_with, noise_std=None if replace_with else 0.5)
    if label is not None:
        r.replaced_by = label
    return tracing.FactTraces([fact.query()], {kind: [r]})


def test_check_replacement_traces_accepts_a_real_replacement(tiny_llama, tok):
    eiffel, liberty, _ = _landmarks()
    check_replacement_traces(tiny_llama, tok, _traces(tiny_llama, tok, eiffel, replace_with=liberty.subject),
                             [eiffel], window=2)


@pytest.mark.parametrize("wrong", ["noise", "same answer", "kind", "window", "relabelled", "not a FactTraces"])
def test_check_replacement_traces_rejects_wrong(tiny_llama, tok, wrong):
    eiffel, liberty, _ = _landmarks()
    if wrong == "noise":                   # Gaussian noise, not a replacement
        traces = _traces(tiny_llama, tok, eiffel)
    elif wrong == "same answer":           # Louvre is in Paris too: the corrupted run keeps the answer
        traces = _traces(tiny_llama, tok, eiffel, replace_with="Louvre Museum", label="Louvre")
    elif wrong == "kind":
        traces = _traces(tiny_llama, tok, eiffel, kind="attn", replace_with=liberty.subject)
        traces = tracing.FactTraces(traces.queries, {"mlp": traces.results["attn"]})
    elif wrong == "window":
        traces = _traces(tiny_llama, tok, eiffel, window=3, replace_with=liberty.subject)
    elif wrong == "relabelled":            # says Statue of Liberty, but replaced with another subject
        traces = _traces(tiny_llama, tok, eiffel, replace_with="Louvre Museum", label=liberty.subject)
    else:
        traces = [_traces(tiny_llama, tok, eiffel, replace_with=liberty.subject)]
    with pytest.raises(CheckFailed):
        check_replacement_traces(tiny_llama, tok, traces, [eiffel], window=2)

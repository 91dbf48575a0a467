"""engram_helpers.tracing: spans, windows, categories, and the traces themselves.

Most tests use a tiny random Llama built from a config with the real default tokenizer (fast); one test
uses the real default model.
"""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from engram_helpers import tracing
from engram_helpers.models import _converted_dir, encode, load_model, next_token_probs


@pytest.fixture(scope="module")
def tok():
    load_model()  # converts the default model once if needed, so that its tokenizer is on disk
    t = AutoTokenizer.from_pretrained(_converted_dir(), local_files_only=True)
    t.pad_token = t.pad_token or t.eos_token
    return t


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_gpt2(tok):
    """GPT-2's architecture (the paper's model family), tiny and random."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


# ------------------------------------------------------------------------------------------ subject span

def test_subject_span_matches_the_subject_tokens(tok):
    batch, _ = encode(tok, PROMPT)
    start, end = tracing.subject_span(tok, PROMPT, SUBJECT)
    assert start >= 1  # position 0 is the <|endoftext|> prefix
    assert tok.decode(batch["input_ids"][0, start:end]).strip() == SUBJECT


@pytest.mark.parametrize("prompt, subject", [
    ("Big Ben is located in the city of", "Big Ben"),          # subject first: no leading space
    ("The capital of France is", "France"),                    # the space is merged into " France"
    ("Lionel Messi is a professional", "Messi"),               # a part of a word sequence
])
def test_subject_span_with_and_without_leading_space(tok, prompt, subject):
    batch, _ = encode(tok, prompt)
    start, end = tracing.subject_span(tok, prompt, subject)
    assert tok.decode(batch["input_ids"][0, start:end]).strip() == subject
    assert end - start >= 1


def test_subject_not_in_prompt_raises(tok):
    with pytest.raises(ValueError) as err:
        tracing.subject_span(tok, "The capital of France is", "Germany")
    assert "Germany" in str(err.value) and "The capital of France is" in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        tracing.subject_span(tok, "The capital of France is", " ")


# ------------------------------------------------------------------------------------------ windows

def test_layer_window_clips_at_both_ends():
    assert tracing.layer_window(0, 30, 10) == [0, 1, 2, 3, 4]
    assert tracing.layer_window(29, 30, 10) == list(range(24, 30))
    assert tracing.layer_window(15, 30, 10) == list(range(10, 20))
    assert tracing.layer_window(3, 30, 1) == [3]
    assert tracing.layer_window(2, 5, 100) == [0, 1, 2, 3, 4]
    assert tracing.layer_window(4, 30, 5) == [2, 3, 4, 5, 6]


def test_layer_window_rejects_bad_input():
    with pytest.raises(ValueError):
        tracing.layer_window(3, 30, 0)
    with pytest.raises(IndexError):
        tracing.layer_window(30, 30, 10)


# ------------------------------------------------------------------------------------------ categories

def test_token_categories():
    cats = tracing.token_categories((2, 5), 9)
    assert cats == {
        "first subject token": [2], "middle subject tokens": [3], "last subject token": [4],
        "first subsequent token": [5], "further tokens": [6, 7], "last token": [8],
    }
    one = tracing.token_categories((4, 5), 6)  # "The capital of France is": one-token subject, then the last
    assert one["first subject token"] == one["last subject token"] == [4]
    assert one["middle subject tokens"] == [] and one["further tokens"] == []
    assert one["first subsequent token"] == one["last token"] == [5]
    at_end = tracing.token_categories((1, 4), 4)
    assert at_end["first subsequent token"] == [] and at_end["last token"] == [3]
    with pytest.raises(ValueError):
        tracing.token_categories((3, 3), 5)


def _result(effects: np.ndarray, span, corrupted=0.1, kind="mlp") -> tracing.TraceResult:
    n_tokens = effects.shape[0]
    return tracing.TraceResult(effects + corrupted, 0.9, corrupted, [f"t{i}" for i in range(n_tokens)], span, kind,
                               "x")


def test_average_effects_groups_by_category():
    # fact A: 6 tokens, subject (1, 4); fact B: 4 tokens, one-token subject at 2.
    a = np.arange(6 * 3, dtype=float).reshape(6, 3)
    b = 100 + np.arange(4 * 3, dtype=float).reshape(4, 3)
    avg = tracing.average_effects([_result(a, (1, 4)), _result(b, (2, 3), corrupted=0.3)])
    cat = dict(zip(tracing.CATEGORIES, range(len(tracing.CATEGORIES))))
    np.testing.assert_allclose(avg.mean[cat["first subject token"]], (a[1] + b[2]) / 2)
    np.testing.assert_allclose(avg.mean[cat["middle subject tokens"]], a[2])           # B has none
    np.testing.assert_allclose(avg.mean[cat["last subject token"]], (a[3] + b[2]) / 2)
    np.testing.assert_allclose(avg.mean[cat["first subsequent token"]], (a[4] + b[3]) / 2)
    np.testing.assert_allclose(avg.mean[cat["further tokens"]], np.full(3, np.nan))    # neither has any
    np.testing.assert_allclose(avg.mean[cat["last token"]], (a[5] + b[3]) / 2)
    assert list(avg.counts) == [2, 1, 2, 2, 0, 2]
    half = 1.96 * np.std([a[1], b[2]], axis=0, ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(avg.high[0] - avg.mean[0], half)
    name, layer, value = avg.peak()
    assert value == np.nanmax(avg.mean) and name in tracing.CATEGORIES and 0 <= layer < 3


def test_average_effects_rejects_mixed_kinds():
    with pytest.raises(ValueError):
        tracing.average_effects([_result(np.zeros((4, 3)), (1, 2)), _result(np.zeros((4, 3)), (1, 2), kind="attn")])
    with pytest.raises(ValueError):
        tracing.average_effects([])


# ------------------------------------------------------------------------------------------ tracing

def test_corrupt_embeddings_only_touches_the_span():
    e = torch.randn(2, 6, 4)
    noise = torch.randn(2, 3, 4)
    out = tracing.corrupt_embeddings(e, (2, 5), noise)
    assert torch.equal(out[:, :2], e[:, :2]) and torch.equal(out[:, 5:], e[:, 5:])
    assert torch.allclose(out[:, 2:5], e[:, 2:5] + noise)
    with pytest.raises(ValueError):
        tracing.corrupt_embeddings(e, (2, 4), noise)


@pytest.mark.parametrize("kind", tracing.KINDS)
def test_fast_trace_equals_the_plain_loop(tiny, tok, kind):
    kw = dict(kind=kind, noise_std=0.5, n_samples=3, window=3, seed=1)
    fast = tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, target="Paris", batch_size=7, **kw)
    plain = tracing.trace_fact_plain(tiny, tok, PROMPT, SUBJECT, target="Paris", **kw)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4, atol=1e-7)
    assert fast.corrupted_prob == pytest.approx(plain.corrupted_prob, rel=1e-5)
    assert fast.scores.shape == (len(fast.tokens), 5) and fast.window == (1 if kind == "layer" else 3)


@pytest.mark.parametrize("kind", tracing.KINDS)
def test_fast_trace_equals_the_plain_loop_on_gpt2(tiny_gpt2, tok, kind):
    kw = dict(kind=kind, noise_std=0.5, n_samples=2, window=2, seed=0, target="Paris")
    fast = tracing.trace_fact(tiny_gpt2, tok, PROMPT, SUBJECT, batch_size=9, **kw)
    plain = tracing.trace_fact_plain(tiny_gpt2, tok, PROMPT, SUBJECT, **kw)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4, atol=1e-7)
    assert fast.scores.shape == (len(fast.tokens), 4)


def test_restoring_the_last_state_gives_the_clean_probability(tiny, tok):
    r = tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, kind="layer", noise_std=1.0, n_samples=4)
    clean = next_token_probs(tiny, tok, PROMPT)[0]
    assert r.target == tok.decode([int(clean.argmax())]).strip()  # target=None: the model's own prediction
    assert r.clean_prob == pytest.approx(float(clean.max()), rel=1e-5)
    assert r.scores[-1, -1] == pytest.approx(r.clean_prob, rel=1e-5)
    assert r.corrupted_prob != pytest.approx(r.clean_prob, rel=1e-3)  # the noise did something
    start = r.subject_span[0]
    np.testing.assert_array_equal(r.scores[:start], r.corrupted_prob)  # before the subject: no effect


def test_seeded_and_batch_size_independent(tiny, tok):
    kw = dict(kind="attn", noise_std=1.0, n_samples=3, window=2)
    a = tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, seed=3, batch_size=5, **kw)
    b = tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, seed=3, batch_size=500, **kw)
    c = tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, seed=4, **kw)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-8)
    assert not np.allclose(a.scores, c.scores)


def test_bad_arguments(tiny, tok):
    with pytest.raises(ValueError, match="kind"):
        tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, kind="residual")
    with pytest.raises(ValueError, match="Germany"):
        tracing.trace_fact(tiny, tok, PROMPT, "Germany")
    with pytest.raises(ValueError, match="n_samples"):
        tracing.trace_fact(tiny, tok, PROMPT, SUBJECT, n_samples=0, noise_std=1.0)


def test_noise_level_is_three_embedding_stds(tiny, tok):
    std = tracing.embedding_std(tiny, tok, ["France", "Eiffel Tower"])
    ids = tok(" France", add_special_tokens=False)["input_ids"] + tok(" Eiffel Tower", add_special_tokens=False)["input_ids"]
    assert std == pytest.approx(float(tiny.get_input_embeddings().weight[ids].std()), rel=1e-6)
    assert tracing.noise_level(tiny, tok, subjects=["France", "Eiffel Tower"]) == pytest.approx(3 * std)


def test_plot_methods(tiny, tok):
    import matplotlib
    matplotlib.use("Agg")
    results = tracing.trace_all(tiny, tok, PROMPT, SUBJECT, noise_std=1.0, n_samples=2, window=2)
    assert set(results) == set(tracing.KINDS)
    for r in results.values():
        ax = r.plot()
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert sum(label.endswith("*") for label in labels) == r.subject_span[1] - r.subject_span[0]
    ax = tracing.average_effects([results["mlp"]]).plot()
    assert len(ax.get_lines()) >= 4


def test_real_model_restores_clean_probability_and_corruption_hurts():
    model, tok = load_model()
    r = tracing.trace_fact(model, tok, "The capital of France is", "France", target="Paris", kind="layer")
    assert r.clean_prob > 0.5  # the model knows it
    assert r.corrupted_prob < r.clean_prob / 5
    assert r.scores[-1, -1] == pytest.approx(r.clean_prob, rel=1e-4)
    assert r.noise_std == pytest.approx(tracing.noise_level(model, tok))  # default: 3 × the dataset's std

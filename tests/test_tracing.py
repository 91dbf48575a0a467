"""engram_helpers.tracing: spans, windows, categories, and the traces themselves.

Most tests use a tiny random Llama built from a config with the real default tokenizer (fast); one test
uses the real default model.
"""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from engram_helpers import tracing
from engram_helpers.models import load_model, next_token_probs
from engram_helpers.query import Query


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
QUERY = Query("The {} is located in the city of", SUBJECT, "Paris")


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
    # bootstrap over two facts: the interval runs from the smaller to the larger fact's value
    np.testing.assert_allclose(avg.low[0], np.minimum(a[1], b[2]))
    np.testing.assert_allclose(avg.high[0], np.maximum(a[1], b[2]))
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
    fast = tracing.trace_fact(tiny, tok, QUERY, batch_size=7, **kw)
    plain = tracing.trace_fact_plain(tiny, tok, QUERY, **kw)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4, atol=1e-7)
    assert fast.corrupted_prob == pytest.approx(plain.corrupted_prob, rel=1e-5)
    assert fast.scores.shape == (len(fast.tokens), 5) and fast.window == (1 if kind == "layer" else 3)
    assert fast.target == plain.target == "Paris"


@pytest.mark.parametrize("kind", tracing.KINDS)
def test_fast_trace_equals_the_plain_loop_on_gpt2(tiny_gpt2, tok, kind):
    kw = dict(kind=kind, noise_std=0.5, n_samples=2, window=2, seed=0)
    fast = tracing.trace_fact(tiny_gpt2, tok, QUERY, batch_size=9, **kw)
    plain = tracing.trace_fact_plain(tiny_gpt2, tok, QUERY, **kw)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4, atol=1e-7)
    assert fast.scores.shape == (len(fast.tokens), 4)


@pytest.mark.parametrize("batch_size", [5, 1024])
def test_trace_all_kinds_in_one_pass_equals_the_plain_loop(tiny, tok, batch_size):
    """All three kinds share the clean, corrupted and restored passes (split into parts by batch_size)."""
    kw = dict(noise_std=0.6, n_samples=2, window=3, seed=4)
    both = tracing.trace_all(tiny, tok, QUERY, batch_size=batch_size, **kw)
    assert list(both) == list(tracing.KINDS)
    for kind, r in both.items():
        plain = tracing.trace_fact_plain(tiny, tok, QUERY, kind=kind, **kw)
        np.testing.assert_allclose(r.scores, plain.scores, rtol=1e-4, atol=1e-7)
        assert r.kind == kind and r.window == (1 if kind == "layer" else 3)
    with pytest.raises(ValueError, match="kind"):
        tracing.trace_all(tiny, tok, QUERY, kinds=(), **kw)


def test_trace_facts_gives_each_query_its_seed(tiny, tok):
    queries = [QUERY, Query("The capital of {} is", "France", "Paris")]
    many = tracing.trace_facts(tiny, tok, queries, kinds=("attn",), seeds=[3, 7], noise_std=1.0, n_samples=2,
                               window=2, progress=False)
    for q, seed, r in zip(queries, [3, 7], many.results["attn"]):
        alone = tracing.trace_fact(tiny, tok, q, kind="attn", noise_std=1.0, n_samples=2, window=2, seed=seed)
        np.testing.assert_array_equal(r.scores, alone.scores)
    with pytest.raises(ValueError, match="one per query"):
        tracing.trace_facts(tiny, tok, queries, seeds=[1], noise_std=1.0)
    with pytest.raises(ValueError, match="not both"):
        tracing.trace_facts(tiny, tok, queries, seeds=[1, 2], seed=0, noise_std=1.0)


def test_fast_trace_equals_the_plain_loop_with_subject_first(tiny, tok):
    """A subject at position 1 right after the prefix token, and a one-token answer position."""
    q = Query("{} is located in the city of", "Big Ben", "London")
    kw = dict(kind="mlp", noise_std=0.7, n_samples=2, window=4, seed=2)
    fast = tracing.trace_fact(tiny, tok, q, **kw)
    plain = tracing.trace_fact_plain(tiny, tok, q, **kw)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4, atol=1e-7)


def test_corrupted_probs_match_the_trace(tiny, tok):
    kw = dict(noise_std=0.8, n_samples=4, seed=5)
    probs = tracing.corrupted_probs(tiny, tok, QUERY, **kw)
    r = tracing.trace_fact(tiny, tok, QUERY, kind="layer", **kw)
    assert probs.shape == (4,) and len(set(probs.tolist())) == 4  # one probability per noise sample
    assert float(probs.mean()) == pytest.approx(r.corrupted_prob, rel=1e-6)


def test_restoring_the_last_state_gives_the_clean_probability(tiny, tok):
    r = tracing.trace_fact(tiny, tok, QUERY.with_target(None), kind="layer", noise_std=1.0, n_samples=4)
    clean = next_token_probs(tiny, tok, PROMPT)[0]
    assert r.target == tok.decode([int(clean.argmax())]).strip()  # target=None: the model's own prediction
    assert r.clean_prob == pytest.approx(float(clean.max()), rel=1e-5)
    assert r.scores[-1, -1] == pytest.approx(r.clean_prob, rel=1e-5)
    assert r.corrupted_prob != pytest.approx(r.clean_prob, rel=1e-3)  # the noise did something
    start = r.subject_span[0]
    np.testing.assert_array_equal(r.scores[:start], r.corrupted_prob)  # before the subject: no effect


def test_seeded_and_batch_size_independent(tiny, tok):
    kw = dict(kind="attn", noise_std=1.0, n_samples=3, window=2)
    a = tracing.trace_fact(tiny, tok, QUERY, seed=3, batch_size=5, **kw)
    b = tracing.trace_fact(tiny, tok, QUERY, seed=3, batch_size=500, **kw)
    c = tracing.trace_fact(tiny, tok, QUERY, seed=4, **kw)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-8)
    assert not np.allclose(a.scores, c.scores)


def test_bad_arguments(tiny, tok):
    with pytest.raises(ValueError, match="kind"):
        tracing.trace_fact(tiny, tok, QUERY, kind="residual")
    with pytest.raises(TypeError, match="Query"):
        tracing.trace_fact(tiny, tok, PROMPT, kind="layer")
    with pytest.raises(ValueError, match="n_samples"):
        tracing.trace_fact(tiny, tok, QUERY, n_samples=0, noise_std=1.0)
    with pytest.raises(ValueError, match="query"):
        tracing.trace_facts(tiny, tok, [])


def test_noise_level_is_three_embedding_stds(tiny, tok):
    std = tracing.embedding_std(tiny, tok, ["France", "Eiffel Tower"])
    ids = (tok(" France", add_special_tokens=False)["input_ids"]
           + tok(" Eiffel Tower", add_special_tokens=False)["input_ids"])
    assert std == pytest.approx(float(tiny.get_input_embeddings().weight[ids].std()), rel=1e-6)
    assert tracing.noise_level(tiny, tok, subjects=["France", "Eiffel Tower"]) == pytest.approx(3 * std)


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding that multiplies its output by sqrt(d_model) inside the module, as Gemma's does."""

    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim ** 0.5


def test_embedding_std_measures_what_the_embedding_module_outputs(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    table_std = tracing.embedding_std(model, tok, ["France"])
    scaled = ScaledEmbedding(len(tok), 16)
    scaled.weight.data.copy_(model.model.embed_tokens.weight)
    model.model.embed_tokens = scaled
    assert tracing.embedding_std(model, tok, ["France"]) == pytest.approx(4.0 * table_std, rel=1e-5)


def _fixed(effects: np.ndarray, span, clean: float, corrupted: float) -> tracing.TraceResult:
    return tracing.TraceResult(effects + corrupted, clean, corrupted, [f"t{i}" for i in range(effects.shape[0])],
                               span, "layer", "x")


def test_shares_divide_by_each_facts_total_effect():
    # Two facts whose restorations bring back exactly half of their (different) total effects.
    a = _fixed(np.full((4, 3), 0.4), (1, 2), clean=0.9, corrupted=0.1)
    b = _fixed(np.full((4, 3), 0.05), (1, 2), clean=0.3, corrupted=0.2)
    assert a.total_effect == pytest.approx(0.8) and b.total_effect == pytest.approx(0.1)
    np.testing.assert_allclose(a.shares, 0.5)
    np.testing.assert_allclose(b.shares, 0.5)
    avg = tracing.average_effects([a, b], share=True)
    np.testing.assert_allclose(avg.mean[np.isfinite(avg.mean)], 0.5)
    assert avg.share and avg.n_facts == 2
    raw = tracing.average_effects([a, b])
    np.testing.assert_allclose(raw.curve("last token"), 0.225)
    with pytest.raises(ValueError, match="total effect"):
        _ = _fixed(np.zeros((4, 3)), (1, 2), clean=0.1, corrupted=0.2).shares


def test_ratio_of_averages_is_not_an_average_of_ratios():
    # A restores 0.4 of 0.8 (half), B restores 0.09 of 0.1 (nine tenths), at every token and layer.
    a = _fixed(np.full((4, 3), 0.4), (1, 2), clean=0.9, corrupted=0.1)
    b = _fixed(np.full((4, 3), 0.09), (1, 2), clean=0.3, corrupted=0.2)
    effects, totals = tracing.category_values([a, b], "last subject token")
    assert effects.shape == (2, 3)
    np.testing.assert_allclose(totals, [0.8, 0.1])
    share, low, high = tracing.ratio_of_averages(effects, totals)
    np.testing.assert_allclose(share, (0.4 + 0.09) / (0.8 + 0.1))           # 0.544..., not (0.5 + 0.9) / 2
    shares, _ = tracing.category_values([a, b], "last subject token", share=True)
    np.testing.assert_allclose(shares, [[0.5] * 3, [0.9] * 3])
    np.testing.assert_allclose(tracing.average_effects([a, b], share=True).curve("last subject token"), 0.7)
    assert share.shape == (3,) and np.all(low <= share + 1e-12) and np.all(share <= high + 1e-12)
    # the bootstrap resamples facts whole: its extremes are the two facts' own shares
    np.testing.assert_allclose(low, 0.5, atol=1e-9)
    np.testing.assert_allclose(high, 0.9, atol=1e-9)
    # one value per fact (each read at its own layer) gives a single share
    one, one_low, one_high = tracing.ratio_of_averages(effects[[0, 1], [2, 0]], totals)
    assert one.shape == () and one_low <= one <= one_high
    # a category some traces lack is averaged over the others only
    c = _fixed(np.full((4, 3), 0.2), (1, 3), clean=0.9, corrupted=0.1)      # has a middle token? no: span of 2
    d = _fixed(np.full((5, 3), 0.3), (1, 4), clean=0.7, corrupted=0.1)      # middle token 2
    middle, middle_totals = tracing.category_values([c, d], "middle subject tokens")
    assert middle.shape == (1, 3)
    np.testing.assert_allclose(tracing.ratio_of_averages(middle, middle_totals)[0], 0.3 / 0.6)
    with pytest.raises(ValueError, match="category"):
        tracing.category_values([a], "middle")
    empty, empty_totals = tracing.category_values([a, b], "middle subject tokens")
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="at least one row"):
        tracing.ratio_of_averages(empty, empty_totals)
    with pytest.raises(ValueError, match="one total per row"):
        tracing.ratio_of_averages(effects, totals[:1])


def test_trace_facts_and_plots(tiny, tok, capsys):
    import matplotlib
    matplotlib.use("Agg")
    queries = [QUERY, Query("The capital of {} is", "France", "Paris")]
    many = tracing.trace_facts(tiny, tok, queries, noise_std=1.0, n_samples=2, window=2)
    assert "2/2 traced" in capsys.readouterr().out
    assert set(many.results) == set(tracing.KINDS) and all(len(v) == 2 for v in many.results.values())
    single = tracing.trace_fact(tiny, tok, queries[1], kind="mlp", noise_std=1.0, n_samples=2, window=2)
    # Traced in a batch of two or alone: the same scores up to float32 summation order (BLAS splits the work
    # differently by batch shape and thread count, so exact equality would hold only on one thread).
    np.testing.assert_allclose(many.results["mlp"][1].scores, single.scores, rtol=0, atol=1e-6)
    for r in many.results["layer"]:
        ax = r.plot()
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert sum(label.endswith("*") for label in labels) == r.subject_span[1] - r.subject_span[0]
    avg = many.average("mlp", share=False)
    ax = avg.plot()
    assert len(ax.get_lines()) >= 4 and "N = 2" in ax.get_title()
    with pytest.raises(ValueError, match="not traced"):
        many.average("residual")


def test_real_model_restores_clean_probability_and_corruption_hurts():
    model, tok = load_model()
    r = tracing.trace_fact(model, tok, Query("The capital of {} is", "France", "Paris"), kind="layer")
    assert r.clean_prob > 0.5  # the model knows it
    assert r.corrupted_prob < r.clean_prob / 5
    assert r.scores[-1, -1] == pytest.approx(r.clean_prob, rel=1e-4)
    assert r.noise_std == pytest.approx(tracing.noise_level(model, tok))  # default: 3 × the dataset's std
    table = model.get_input_embeddings().weight  # SmolLM2 does not scale: module output = table rows
    ids = [i for f in ["France", "Eiffel Tower"] for i in tok(" " + f, add_special_tokens=False)["input_ids"]]
    assert tracing.embedding_std(model, tok, ["France", "Eiffel Tower"]) == \
        pytest.approx(float(table[ids].std()), rel=1e-6)


def test_spread_over_relations_is_seeded_and_round_robin():
    from engram_helpers.data import load_facts, relations, spread_over_relations

    facts = load_facts()
    rels = relations(facts)
    chosen = spread_over_relations(facts, 2 * len(rels), seed=0)
    assert len(chosen) == 2 * len(rels) and len(set(chosen)) == len(chosen)
    assert [f.relation for f in chosen] == rels + rels  # one per relation, in turn
    assert spread_over_relations(facts, 2 * len(rels), seed=0) == chosen
    assert spread_over_relations(facts, 2 * len(rels), seed=1) != chosen
    assert set(spread_over_relations(facts, 10_000)) == set(facts)  # asking for more gives all of them
    with pytest.raises(ValueError):
        spread_over_relations(facts, 0)


# ------------------------------------------------------------------------------------------ symmetric token replacement

def test_replacement_runs_the_prompt_of_the_other_subject(tiny, tok):
    """Corrupting by replacement gives exactly the other subject's prompt: its probability of the target."""
    other = "Louvre Museum"
    assert len(tok(" " + other, add_special_tokens=False)["input_ids"]) == \
        len(tok(" " + SUBJECT, add_special_tokens=False)["input_ids"])
    probs = tracing.corrupted_probs(tiny, tok, QUERY, n_samples=1, replace_with=other)
    swapped = next_token_probs(tiny, tok, QUERY.template.format(other))[0, tok(" Paris")["input_ids"][0]]
    assert float(probs[0]) == pytest.approx(float(swapped), rel=1e-4)
    delta = tracing.subject_replacement(tiny, tok, QUERY, other)
    assert delta.shape == (1, len(tok(" " + SUBJECT, add_special_tokens=False)["input_ids"]), 32)


@pytest.mark.parametrize("kind", tracing.KINDS)
def test_replacement_trace_equals_the_plain_loop(tiny, tok, kind):
    kw = dict(kind=kind, n_samples=1, window=3, replace_with="Louvre Museum")
    fast = tracing.trace_fact(tiny, tok, QUERY, **kw)
    plain = tracing.trace_fact_plain(tiny, tok, QUERY, **kw)
    np.testing.assert_allclose(fast.scores, plain.scores, rtol=1e-4, atol=1e-7)
    assert fast.replaced_by == plain.replaced_by == "Louvre Museum" and fast.noise_std == 0.0
    if kind == "layer":  # the last layer's clean state at the last token gives back the clean output
        assert fast.scores[-1, -1] == pytest.approx(fast.clean_prob, rel=1e-4)


def test_replacement_rejects_bad_subjects(tiny, tok):
    with pytest.raises(ValueError, match="same number of tokens"):
        tracing.trace_fact(tiny, tok, QUERY, n_samples=1, replace_with="Rome")
    with pytest.raises(ValueError, match="different subject"):
        tracing.subject_replacement(tiny, tok, QUERY, SUBJECT)
    with pytest.raises(ValueError, match="n_samples=1"):
        tracing.trace_fact(tiny, tok, QUERY, n_samples=3, replace_with="Louvre Museum")


def test_replacement_subject_same_relation_other_answer_same_length(tok):
    from engram_helpers.data import load_facts

    facts = load_facts()
    eiffel = next(f for f in facts if f.subject == "Eiffel Tower")
    other = tracing.replacement_subject(tok, eiffel, facts)
    match = next(f for f in facts if f.subject == other)
    assert match.relation == eiffel.relation and match.target_true != "Paris"
    assert len(tok(" " + other, add_special_tokens=False)["input_ids"]) == 3
    assert tracing.replacement_subject(tok, eiffel, [eiffel]) is None


def test_cross_fit_layer_reads_each_half_where_the_other_half_peaks():
    # The two seeded halves peak at different layers (1 and 2): each half must be read at the other's peak.
    halves = np.array_split(np.random.default_rng(0).permutation(8), 2)
    values = np.zeros((8, 4))
    values[halves[0], 1] = 1.0
    values[halves[1], 2] = 1.0
    values[:, 3] = 0.4  # nobody's peak over all layers, but the peak among layers 0 and 3
    chosen = tracing.cross_fit_layer(values, seed=0)
    assert set(chosen[halves[0]]) == {2} and set(chosen[halves[1]]) == {1}
    assert set(tracing.cross_fit_layer(values, layers=[0, 3], seed=0)) == {3}  # only the layers allowed
    # Noise alone: the in-sample peak is biased upward, the cross-fitted reading is not (on average).
    rng = np.random.default_rng(1)
    bias_in, bias_cross = [], []
    for _ in range(200):
        noise = rng.normal(size=(10, 12))
        bias_in.append(noise.mean(axis=0).max())
        bias_cross.append(noise[np.arange(10), tracing.cross_fit_layer(noise, seed=int(rng.integers(1e6)))].mean())
    assert np.mean(bias_in) > 0.3 and abs(np.mean(bias_cross)) < 0.1
    with pytest.raises(ValueError, match="at least 2 facts"):
        tracing.cross_fit_layer(np.zeros((1, 3)))

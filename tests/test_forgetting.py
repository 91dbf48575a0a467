"""Tests of engram_helpers.forgetting: lesions go through engram_helpers.weights and restore exactly, neuron
lesions silence exactly the chosen neurons (checked against hooks), attribution matches a finite difference and
its per-fact form sums to the total, and the experiments leave the model as they found it."""

from __future__ import annotations

import pytest
import torch

from engram_helpers import data, weights
from engram_helpers import forgetting as F
from engram_helpers.hooks import trace_many
from engram_helpers.models import arch


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, saved) -> bool:
    return all(torch.equal(p, saved[n]) for n, p in model.named_parameters())


# --- masks and lesions ------------------------------------------------------------------------------------


def test_random_weight_mask_exact_counts_and_seeded():
    params = {"a": torch.zeros(30, 7), "b": torch.zeros(11)}
    m = F.random_weight_mask(params, 0.25, seed=4)
    assert int(m["a"].sum()) == round(0.25 * 210) and int(m["b"].sum()) == round(0.25 * 11)
    assert all(torch.equal(m[n], F.random_weight_mask(params, 0.25, seed=4)[n]) for n in params)
    assert not torch.equal(m["a"], F.random_weight_mask(params, 0.25, seed=5)["a"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.random_weight_mask(params, 1.2)


def test_lesion_neurons_goes_through_weights_and_stacks(tiny_model):
    saved = _weights(tiny_model)
    shape = F.mlp_shape(tiny_model)
    a, b = F.random_neurons(shape, 7, seed=0), F.random_neurons(shape, 7, seed=1)
    first = F.lesion_neurons(tiny_model, a)
    assert first in weights.active_changes(tiny_model) and first.info["n_neurons"] == 7
    second = F.lesion_neurons(tiny_model, b)
    with pytest.raises(RuntimeError, match="reverse order"):
        first.undo()
    second.undo()
    first.undo()
    assert _same(tiny_model, saved)
    with F.lesion_neurons(tiny_model, torch.zeros(shape, dtype=torch.bool)):
        assert _same(tiny_model, saved)
    assert not weights.active_changes(tiny_model)


def test_neuron_lesion_equals_zeroing_the_activation(tiny_model):
    """Zeroing neuron columns of the output projection = zeroing those MLP activations with a hook."""
    a = arch(tiny_model)
    shape = F.mlp_shape(tiny_model)
    neurons = F.random_neurons(shape, k=shape[0] * shape[1] // 5, seed=1)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    names = a.names("mlp_out")

    def silence(x, name):
        return x * (~neurons[names.index(name)]).to(x.dtype)

    with torch.no_grad(), trace_many(tiny_model, names, retain_output=False, edit_input=silence):
        expected = tiny_model(input_ids=ids).logits
    saved = _weights(tiny_model)
    with torch.no_grad(), F.lesion_neurons(tiny_model, neurons):
        got = tiny_model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert _same(tiny_model, saved)
    with pytest.raises(ValueError, match="layers × MLP neurons"):
        F.neuron_mask(tiny_model, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="layers × MLP neurons"):
        F.lesion_neurons(tiny_model, torch.zeros(shape))


def test_output_vector_is_what_the_neuron_adds(tiny_model):
    """Lesioning one neuron changes the MLP output by exactly activation × its output vector."""
    a = arch(tiny_model)
    shape = F.mlp_shape(tiny_model)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), trace_many(tiny_model, [a.mlp_out_name(1)], retain_input=True) as tr:
        tiny_model(input_ids=ids)
    x = tr[a.mlp_out_name(1)].input
    one = torch.zeros(shape, dtype=torch.bool)
    one[1, 3] = True
    with torch.no_grad(), trace_many(tiny_model, [a.mlp_out_name(1)]) as full:
        tiny_model(input_ids=ids)
    with torch.no_grad(), F.lesion_neurons(tiny_model, one), trace_many(tiny_model, [a.mlp_out_name(1)]) as les:
        tiny_model(input_ids=ids)
    diff = full[a.mlp_out_name(1)].output - les[a.mlp_out_name(1)].output
    assert torch.allclose(diff, x[..., 3:4] * F.output_vector(tiny_model, 1, 3), atol=1e-5)


def test_output_norm_neurons_rank_output_vectors(tiny_model):
    """The weight-only rule ranks neurons by the length of the vector each one writes (output_vector)."""
    norms = F.output_norms(tiny_model)
    shape = F.mlp_shape(tiny_model)
    assert norms.shape == shape
    for layer, neuron in [(0, 0), (1, 3), (shape[0] - 1, shape[1] - 1)]:
        assert norms[layer, neuron] == pytest.approx(float(F.output_vector(tiny_model, layer, neuron).norm()), rel=1e-5)
    before = _weights(tiny_model)
    chosen = F.output_norm_neurons(tiny_model, 6)
    assert int(chosen.sum()) == 6 and norms[chosen].min() >= norms[~chosen].max()
    exclude = chosen.clone()
    second = F.output_norm_neurons(tiny_model, 6, exclude)
    assert int(second.sum()) == 6 and not (second & exclude).any()
    assert norms[second].min() >= norms[~(second | exclude)].max()
    assert _same(tiny_model, before), "choosing neurons leaves the model unchanged"
    with pytest.raises(ValueError, match="outside exclude"):
        F.output_norm_neurons(tiny_model, shape[0] * shape[1] - 5, exclude)


def test_random_and_top_neurons():
    n = F.random_neurons((4, 10), 13, seed=2)
    assert n.shape == (4, 10) and int(n.sum()) == 13
    assert torch.equal(n, F.random_neurons((4, 10), 13, seed=2))
    scores = torch.arange(40.0).reshape(4, 10)
    top = F.top_neurons(scores, 5)
    assert top[3, 5:].all() and int(top.sum()) == 5
    with pytest.raises(ValueError):
        F.random_neurons((4, 10), 41)
    exclude = torch.zeros(4, 10, dtype=torch.bool)
    exclude[3, 8:] = True
    top = F.top_neurons(scores, 5, exclude)
    assert not (top & exclude).any() and top[3, 3:8].all() and int(top.sum()) == 5
    r = F.random_neurons((4, 10), 38, seed=0, exclude=exclude)
    assert int(r.sum()) == 38 and not (r & exclude).any()
    with pytest.raises(ValueError):
        F.random_neurons((4, 10), 39, exclude=exclude)


def test_contiguous_regions_and_lashley_sizes():
    shape = (6, 10)
    blk = F.layer_block(shape, 2, 3)
    assert blk[2:5].all() and int(blk.sum()) == 30
    nb = F.neuron_block(shape, 4, 3, 5)
    assert nb[4, 3:8].all() and int(nb.sum()) == 5
    with pytest.raises(ValueError, match="does not fit"):
        F.layer_block(shape, 5, 2)
    with pytest.raises(ValueError, match="does not fit"):
        F.neuron_block(shape, 0, 8, 5)
    exclude = torch.zeros(shape, dtype=torch.bool)
    exclude[0, 0] = True
    regions = F.lashley_regions(shape, layer_widths=[1, 2], n_locations=3, block_width=4, block_layers=[0, 5],
                                seeds=[0, 1], exclude=exclude)
    kinds = {r["kind"] for r in regions}
    assert kinds == {"layer block", "neuron block", "scattered (layer block)", "scattered (neuron block)"}
    assert [r["start"] for r in regions if r["kind"] == "layer block" and r["size"] == 2] == [0, 2, 4]
    assert not any((r["neurons"] & exclude).any() for r in regions)
    # every contiguous lesion has scattered twins of exactly the same size
    sizes = {int(r["neurons"].sum()) for r in regions if not r["kind"].startswith("scattered")}
    for k in sizes:
        assert sum(1 for r in regions if r["kind"].startswith("scattered") and int(r["neurons"].sum()) == k) == 2


def test_token_rank():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    assert F.token_rank(probs, torch.tensor([1, 0])).tolist() == [0, 1]
    assert F.token_rank(probs, torch.tensor([0, 1])).tolist() == [2, 1]
    with pytest.raises(ValueError):
        F.token_rank(probs, torch.tensor([0]))


# --- attribution and recall on a small Llama with the real tokenizer ------------------------------------


@pytest.fixture(scope="module")
def small_llama_and_tok(default_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = default_model
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).double().eval().requires_grad_(False)
    return model, tok


def test_attribution_matches_finite_difference(small_llama_and_tok):
    """Σ_neurons of a layer's attribution = d/dε of the objective when that layer's activations are scaled
    by (1 + ε), at ε = 0 (central difference, float64)."""
    model, tok = small_llama_and_tok
    facts = data.load_facts()[:3]
    scores = F.neuron_attribution(model, tok, facts)
    assert scores.shape == F.mlp_shape(model)
    names = arch(model).names("mlp_out")

    def objective(layer: int, eps: float) -> float:
        def scale(x, name):
            return x * (1 + eps) if name == names[layer] else x
        total = 0.0
        with torch.no_grad(), trace_many(model, names, retain_output=False, edit_input=scale):
            for f in facts:
                batch, last = F.encode(tok, [f.prompt])  # float64 all the way: a float32 softmax is too coarse
                logp = torch.log_softmax(model(**batch).logits[0, last[0]].double(), dim=-1)
                total += float(logp[F.first_token_id(tok, f.target_true)])
        return total

    eps = 1e-4
    for layer in range(3):
        fd = (objective(layer, eps) - objective(layer, -eps)) / (2 * eps)
        assert abs(fd - float(scores[layer].sum())) < 1e-3 * max(1.0, abs(fd)), (layer, fd, float(scores[layer].sum()))


def test_target_logprobs_match_next_token_probs(small_llama_and_tok):
    model, tok = small_llama_and_tok
    facts = data.load_facts()[:5]
    logp, top1 = F.target_logprobs(model, tok, facts, batch_size=2)
    probs = F.next_token_probs(model, tok, [f.prompt for f in facts])
    ids = torch.tensor([F.first_token_id(tok, f.target_true) for f in facts])
    assert torch.allclose(logp, probs.gather(1, ids[:, None]).squeeze(1).double().log(), atol=1e-5)
    assert torch.equal(top1, probs.argmax(-1) == ids)


def test_per_fact_attribution_sums_to_the_total(small_llama_and_tok):
    model, tok = small_llama_and_tok
    facts = data.load_facts()[:5]
    per = F.neuron_attribution(model, tok, facts, batch_size=2, per_fact=True)
    assert per.shape == (5, *F.mlp_shape(model))
    assert torch.allclose(per.sum(0), F.neuron_attribution(model, tok, facts), atol=1e-5)
    alone = F.neuron_attribution(model, tok, facts[3:4])
    assert torch.allclose(per[3], alone, atol=1e-5), "a fact's scores do not depend on its batch"


def test_region_lesions_breakers_and_dissociation_restore(small_llama_and_tok):
    model, tok = small_llama_and_tok
    facts = data.load_facts()[:6]
    saved = _weights(model)
    shape = F.mlp_shape(model)
    regions = F.lashley_regions(shape, [1], 2, 12, [1], seeds=[0])
    rows = F.region_lesions(model, tok, facts, regions)
    assert len(rows) == len(regions) and all(0 <= r["recall"] <= 1 and "neurons" not in r for r in rows)
    everything = F.lesion_effect(model, tok, facts, torch.ones(shape, dtype=torch.bool))
    assert everything["drop"].shape == (6,) and everything["n_neurons"] == shape[0] * shape[1]
    scores = F.neuron_attribution(model, tok, facts)
    found, steps = F.breakers(model, tok, facts, scores, n_candidates=4, max_recall=1.0)
    assert len(steps) == 1 and int(found.sum()) == 1  # max_recall=1: the best neuron alone is enough
    assert found[steps[0]["layer"], steps[0]["neuron"]] and torch.equal(found, F.top_neurons(scores, 1))
    none, steps = F.breakers(model, tok, facts, scores, n_candidates=3, max_recall=-1.0)
    assert not none.any() and [r["n"] for r in steps] == [1, 2, 3]
    single = F.single_neuron_effects(model, tok, facts, F.top_neurons(scores, 2))
    assert len(single) == 2 and all(0 <= r["recall"] <= 1 for r in single)
    per = F.neuron_attribution(model, tok, facts, per_fact=True)
    d = F.dissociation(model, tok, facts, per, k=5, exclude=found)
    assert d.drop.shape == d.drop_random.shape == (6, 6) and not d.pairs.diagonal().any()
    share, lo, hi = d.share_double()
    assert 0 <= lo <= share <= hi <= 1
    assert d.specificity().shape == (6,)
    with pytest.raises(ValueError, match="per_fact=True"):
        F.dissociation(model, tok, facts[:3], per, k=5)
    assert _same(model, saved) and not weights.active_changes(model)


def test_double_dissociation_logic():
    """A hand-made drop matrix: facts 0 and 1 dissociate, fact 2's set hurts everyone alike."""
    drop = torch.tensor([[2.0, 0.5, 0.1], [0.3, 1.0, 0.1], [1.0, 1.0, 1.0]], dtype=torch.double)
    pairs = ~torch.eye(3, dtype=torch.bool)
    d = F.Dissociation(drop, drop.T.clone(), pairs, k=1, excluded=torch.zeros(1, 1, dtype=torch.bool))
    dd = d.double(margin=0.0)
    assert dd[0, 1] and dd[1, 0] and not dd[0, 2] and not dd[2, 0]
    assert d.share_double(margin=0.0, n_boot=50)[0] == pytest.approx(2 / 6)
    assert not d.double(margin=0.8)[0, 1], "fact 1's own drop (1.0) does not beat fact 0's (0.3) by 0.8"
    assert torch.allclose(d.specificity(), torch.tensor([2 - 0.3, 1 - 0.2, 0.0], dtype=torch.double))
    # against the other facts' sets (columns): fact 0 loses (0.3 + 1.0) / 2 under sets 1 and 2, fact 2 only 0.1
    assert torch.allclose(d.specificity(against="sets"), torch.tensor([2 - 0.65, 1 - 0.75, 1 - 0.1],
                                                                      dtype=torch.double))
    with pytest.raises(ValueError, match="'facts' or 'sets'"):
        d.specificity(against="columns")


# --- the real default model -------------------------------------------------------------------------------


def test_recall_neutral_answer_and_erasure_report(default_model):
    model, tok = default_model
    known = data.known_facts(model, tok, data.load_facts()[:12])
    assert known, "the default model should know some of the first facts"
    assert F.recall(model, tok, known) == 1.0
    f = known[0]
    target = F.neutral_answer(model, tok, f)
    assert target.isalpha() and F.first_token_id(tok, target) != F.first_token_id(tok, f.target_true)
    report = F.erasure_report(model, tok, f, target)
    assert report["old_top1"] == 1 and report["old_rank"] == 0
    assert 0 <= report["neighbours_true"] <= report["n_neighbours"] == len(f.neighbourhood)
    assert len(report["neighbours_top1"]) == len(f.neighbourhood) and sum(report["neighbours_top1"]) == report[
        "neighbours_true"]
    assert int(F.answer_rank(model, tok, [f.prompt], f.target_true)[0]) == 0


def test_silencing_every_mlp_neuron_destroys_recall_and_text(default_model):
    model, tok = default_model
    known = data.known_facts(model, tok, data.load_facts()[:12])
    text = ["The government said on Tuesday that the new rules would come into force next year, after a long"
            " consultation with businesses and unions."]
    intact = F.next_token_accuracy(model, tok, text)
    shape = F.mlp_shape(model)
    with F.lesion_neurons(model, torch.ones(shape, dtype=torch.bool)):
        assert F.recall(model, tok, known) <= 0.25
        assert F.next_token_accuracy(model, tok, text) < intact

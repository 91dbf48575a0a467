"""Tests of engram_helpers.forgetting: lesions restore exactly, neuron lesions silence exactly the chosen
neurons (checked against hooks), attribution matches a finite difference, and the sweep leaves the model as
it found it."""

from __future__ import annotations

import pytest
import torch

from engram_helpers import data
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


def test_lesioned_zeroes_and_restores_exactly(tiny_model):
    saved = _weights(tiny_model)
    name = next(n for n, p in tiny_model.named_parameters() if p.dim() == 2)
    masks = F.random_weight_mask({name: saved[name]}, 0.3, seed=0)
    with F.lesioned(tiny_model, masks):
        p = dict(tiny_model.named_parameters())[name]
        assert p[masks[name]].abs().max() == 0
        assert torch.equal(p[~masks[name]], saved[name][~masks[name]])
    assert _same(tiny_model, saved)
    with pytest.raises(RuntimeError):
        with F.lesioned(tiny_model, masks):
            raise RuntimeError("boom")
    assert _same(tiny_model, saved)


def test_lesioned_rejects_bad_masks(tiny_llama):
    with pytest.raises(KeyError, match="named_parameters"):
        with F.lesioned(tiny_llama, {"no.such.weight": torch.zeros(2, dtype=torch.bool)}):
            pass
    name, p = next(iter(tiny_llama.named_parameters()))
    with pytest.raises(ValueError, match="bool tensor"):
        with F.lesioned(tiny_llama, {name: torch.zeros(p.shape)}):
            pass


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
    with torch.no_grad(), F.lesioned_neurons(tiny_model, neurons):
        got = tiny_model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert _same(tiny_model, saved)
    with pytest.raises(ValueError, match="layers × MLP neurons"):
        F.neuron_masks(tiny_model, torch.zeros(2, 2, dtype=torch.bool))


def test_random_and_top_neurons():
    n = F.random_neurons((4, 10), 13, seed=2)
    assert n.shape == (4, 10) and int(n.sum()) == 13
    assert torch.equal(n, F.random_neurons((4, 10), 13, seed=2))
    scores = torch.arange(40.0).reshape(4, 10)
    top = F.top_neurons(scores, 5)
    assert top[3, 5:].all() and int(top.sum()) == 5
    with pytest.raises(ValueError):
        F.random_neurons((4, 10), 41)


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
                logp = torch.log(F.next_token_probs(model, tok, f.prompt)[0].double())
                total += float(logp[F.first_token_id(tok, f.target_true)])
        return total

    eps = 1e-4
    for layer in range(3):
        fd = (objective(layer, eps) - objective(layer, -eps)) / (2 * eps)
        assert abs(fd - float(scores[layer].sum())) < 1e-3 * max(1.0, abs(fd)), (layer, fd, float(scores[layer].sum()))


def test_lesion_sweep_shapes_and_restores(small_llama_and_tok):
    model, tok = small_llama_and_tok
    facts = data.load_facts()[:4]
    saved = _weights(model)
    scores = F.neuron_attribution(model, tok, facts)
    sweep = F.lesion_sweep(model, tok, {"a": facts[:2], "b": facts[2:]}, scores, [0.1, 0.5], seeds=[0, 1])
    assert sweep["k"] == [round(0.1 * 144), round(0.5 * 144)]
    assert sweep["engram"]["a"].shape == (2,) and sweep["random"]["b"].shape == (2, 2)
    assert all(((v >= 0) & (v <= 1)).all() for v in [*sweep["engram"].values(), *sweep["random"].values()])
    assert _same(model, saved)
    with pytest.raises(ValueError, match="at least one"):
        F.lesion_sweep(model, tok, {"a": facts}, scores, [1e-6])


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
    assert 0 <= report["neighbours_kept"] <= report["n_neighbours"] == len(f.neighbourhood)
    assert int(F.answer_rank(model, tok, [f.prompt], f.target_true)[0]) == 0


def test_silencing_every_mlp_neuron_destroys_recall_and_text(default_model):
    model, tok = default_model
    known = data.known_facts(model, tok, data.load_facts()[:12])
    text = ["The government said on Tuesday that the new rules would come into force next year, after a long"
            " consultation with businesses and unions."]
    intact = F.next_token_accuracy(model, tok, text)
    shape = F.mlp_shape(model)
    with F.lesioned_neurons(model, torch.ones(shape, dtype=torch.bool)):
        assert F.recall(model, tok, known) <= 0.25
        assert F.next_token_accuracy(model, tok, text) < intact

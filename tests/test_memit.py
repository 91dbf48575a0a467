"""engram_helpers.memit: the batched update, the residual spread, a batch of one against ROME, exact undo,
bad input, and (slow) one real batch on the default model.

Most tests use small real computations on random matrices, or a tiny random Llama with the real default
tokenizer (as tests/test_tracing.py does).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engram_helpers import memit, rome, weights
from engram_helpers.models import load_model, mlp_out_weight
from engram_helpers.query import Query


def _problem(seed=0, n=3, d_out=6, d_in=9):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    return W, K, R, A @ A.T / 40


# ------------------------------------------------------------------------------------- pure tensor steps


def test_batch_update_solves_the_regularized_least_squares():
    """ΔW minimizes λ tr(ΔW C ΔWᵀ) + ‖ΔW Kᵀ − Rᵀ‖²: its gradient there is zero."""
    _, K, R, C = _problem()
    lam = 0.7
    dW = memit.batch_update(K, R, C, lam).double()
    grad = lam * dW @ C + (dW @ K.T - R.T) @ K  # half the gradient of the objective
    assert grad.abs().max() < 1e-5
    assert dW.shape == (6, 9)


def test_batch_update_writes_the_residuals_as_lambda_goes_to_zero():
    _, K, R, C = _problem(1)
    dW = memit.batch_update(K, R, C, 1e-9).double()
    assert torch.allclose(dW @ K.T, R.T, atol=1e-4)


def test_batch_of_one_is_rome_scaled_by_s_over_lambda_plus_s():
    """One key, one layer: ΔW = s/(λ+s) · ROME's ΔW with s = kᵀC⁻¹k (Sherman–Morrison).

    So the update has ROME's rank-one direction (C⁻¹k), writes s/(λ+s) of the residual on k, and equals
    ROME's update exactly as λ → 0.
    """
    W, K, R, C = _problem(2, n=1)
    k, r = K[0], R[0]
    s = float(k @ torch.linalg.solve(C, k))
    rome_dW = rome.rank_one_update(W, k, W @ k + r, C)
    for lam in (0.5, 3.0, 50.0):
        dW = memit.batch_update(K, R, C, lam).double()
        assert torch.linalg.matrix_rank(dW, rtol=1e-5) == 1  # float32 result: rank up to its rounding
        assert torch.allclose(dW, s / (lam + s) * rome_dW, atol=1e-6)
        assert torch.allclose(dW @ k, s / (lam + s) * r, atol=1e-6)
    assert torch.allclose(memit.batch_update(K, R, C, 1e-10).double(), rome_dW, atol=1e-6)


def test_spread_residual_gives_each_layer_its_share():
    g = torch.Generator().manual_seed(0)
    z, h = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.allclose(memit.spread_residual(z, h, 0, 4), (z - h) / 4)
    assert torch.allclose(memit.spread_residual(z, h, 3, 4), z - h)  # the last layer takes all that is left
    # if every layer writes its share exactly, the error is gone after the last layer
    cur = h.clone()
    for i in range(4):
        cur = cur + memit.spread_residual(z, cur, i, 4)
    assert torch.allclose(cur, z, atol=1e-6)


def test_pure_steps_reject_bad_shapes():
    _, K, R, C = _problem()
    with pytest.raises(ValueError, match="same n"):
        memit.batch_update(K, R[:2], C, 1.0)
    with pytest.raises(ValueError, match="C must be"):
        memit.batch_update(K, R, C[:4, :4], 1.0)
    with pytest.raises(ValueError, match="positive"):
        memit.batch_update(K, R, C, 0.0)
    with pytest.raises(ValueError, match="empty"):
        memit.batch_update(K[:0], R[:0], C, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        memit.spread_residual(torch.zeros(2, 3), torch.zeros(3, 3), 0, 2)
    with pytest.raises(ValueError, match="index"):
        memit.spread_residual(torch.zeros(2, 3), torch.zeros(2, 3), 2, 2)


# ------------------------------------------------------------------------- tiny model, real tokenizer




@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


REQS = [Query("The {} is located in the city of", "Eiffel Tower", "Rome"),
        Query("{} is located in the city of", "Big Ben", "Berlin"),
        Query("The capital of {} is", "Japan", "Madrid")]


def _hp(layers=(1, 2), lam=1.0):
    value = rome.HParams(layer=layers[-1], v_steps=3, n_prefixes=1, prefix_len=3)
    return memit.MemitHParams(layers=tuple(layers), mom2_update_weight=lam, value=value)


def _identity_Cs(model, layers):
    d = mlp_out_weight(model, 0).shape[1]
    return {layer: torch.eye(d) for layer in layers}


def test_keys_and_residuals_have_the_documented_shapes(tiny, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    K = memit.compute_keys(tiny, tok, REQS, 1, ["I think", "The day"])
    assert K.shape == (3, 48)
    alone = rome.compute_key(tiny, tok, REQS[1], 1, ["I think", "The day"])
    assert torch.allclose(K[1], alone, atol=1e-5), "batched keys must equal ROME's key of each fact"
    h = memit.subject_residual(tiny, tok, REQS, 2)
    assert h.shape == (3, 32)


def test_one_layer_memit_writes_its_share_of_z(tiny, tok, tmp_path, monkeypatch):
    """With one critical layer the residual after it moves from h to h + s/(λ+s)·(z − h) per fact
    (only for a single fact, so no other key interferes): ΔW k = s/(λ+s) r with r = z − h."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    hp = _hp(layers=(2,), lam=1e-6)
    Cs = _identity_Cs(tiny, hp.layers)
    req = REQS[:1]
    targets = memit.compute_targets(tiny, tok, req, 2, hp.value)
    h0 = memit.subject_residual(tiny, tok, req, 2)
    with memit.apply_memit(tiny, tok, req, Cs, hp, targets=targets):
        h1 = memit.subject_residual(tiny, tok, req, 2)
    # λ ≈ 0: the bare prompt's residual reaches z up to the difference between the bare-prompt key and the
    # key averaged with the context prefix (the update is exact on the averaged key)
    assert (h1 - targets.z).norm() < 0.5 * (h0 - targets.z).norm()
    assert (targets.delta.norm() > 0).item()


def test_undo_restores_every_weight_bit_for_bit(tiny, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    hp = _hp(layers=(0, 2))
    edit = memit.apply_memit(tiny, tok, REQS, _identity_Cs(tiny, hp.layers), hp)
    assert isinstance(edit, weights.WeightChange) and edit.label == "memit"
    assert weights.active_changes(tiny) == [edit], "one change for the whole batch over all layers"
    assert set(edit.info["deltas"]) == {0, 2}
    assert edit.names == ["model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    for layer in (0, 2):
        assert not torch.equal(mlp_out_weight(tiny, layer), before[f"model.layers.{layer}.mlp.down_proj.weight"])
    assert [e["layer"] for e in edit.info["log"]] == [0, 2]
    edit.undo()
    edit.undo()  # a second undo does nothing
    assert not edit.active
    for n, p in tiny.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_error_shrinks_layer_by_layer(tiny, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    hp = _hp(layers=(0, 1, 2), lam=1e-3)
    with memit.apply_memit(tiny, tok, REQS, _identity_Cs(tiny, hp.layers), hp) as edit:
        errors = [e["error"] for e in edit.info["log"]]
        after = (memit.subject_residual(tiny, tok, REQS, 2) - edit.info["targets"].z).norm(dim=1).mean()
    assert after < errors[0], (errors, float(after))


def test_bad_input_errors_clearly(tiny, tok):
    hp = _hp()
    Cs = _identity_Cs(tiny, (1, 2))
    with pytest.raises(ValueError, match="empty"):
        memit.apply_memit(tiny, tok, [], Cs, hp)
    with pytest.raises(ValueError, match="different new objects"):
        memit.apply_memit(tiny, tok, [REQS[0], REQS[0].with_target("Paris")], Cs, hp)
    with pytest.raises(TypeError, match="must be a Query"):
        memit.apply_memit(tiny, tok, ["The capital of Japan is"], Cs, hp)
    with pytest.raises(ValueError, match="no target"):
        memit.apply_memit(tiny, tok, [REQS[0].with_target(None)], Cs, hp)
    with pytest.raises(IndexError, match="layers 0..3"):
        memit.apply_memit(tiny, tok, REQS, Cs, _hp(layers=(2, 4)))
    with pytest.raises(ValueError, match="strictly increasing"):
        memit.apply_memit(tiny, tok, REQS, Cs, _hp(layers=(2, 1)))
    with pytest.raises(ValueError, match="model's last layer"):
        memit.apply_memit(tiny, tok, REQS, Cs, _hp(layers=(2, 3)))
    with pytest.raises(ValueError, match="No critical layers"):
        memit.check_layers(tiny, ())
    with pytest.raises(ValueError, match=r"No key statistics C for layers \[2\]"):
        memit.apply_memit(tiny, tok, REQS, {1: Cs[1]}, hp)
    with pytest.raises(ValueError, match="C must be"):
        memit.apply_memit(tiny, tok, REQS, {1: Cs[1], 2: torch.eye(5)}, hp,
                          targets=memit.Targets(torch.zeros(3, 32), torch.zeros(3, 32), torch.zeros(3), 2))
    with pytest.raises(ValueError, match="targets are for layer 1"):
        memit.apply_memit(tiny, tok, REQS, Cs, hp,
                          targets=memit.Targets(torch.zeros(3, 32), torch.zeros(3, 32), torch.zeros(3), 1))
    # a failure midway leaves the model as it was
    before = mlp_out_weight(tiny, 1).clone()
    with pytest.raises(ValueError, match="C must be"):
        memit.apply_memit(tiny, tok, REQS, {1: Cs[1], 2: torch.eye(5)}, hp,
                          targets=memit.Targets(torch.zeros(3, 32), torch.zeros(3, 32), torch.zeros(3), 2))
    assert torch.equal(mlp_out_weight(tiny, 1), before)
    assert weights.active_changes(tiny) == []


# ------------------------------------------------------------------------------------ real model (slow)


@pytest.mark.slow
def test_real_batch_takes_on_the_new_objects(tmp_path):
    """Three known facts in one batch on the default model: each new object beats the true one afterwards."""
    from engram_helpers import data, evaluation, layer_stats

    model, tok = load_model()
    facts = [f for f in data.known_facts(model, tok) if f.relation == "capital_of"][:3]
    hp = memit.hparams_for(model)
    hp = replace(hp, value=rome.with_settings(hp.value, n_prefixes=1))
    Cs = layer_stats.second_moments(model, tok, hp.layers, n_tokens=hp.value.cov_tokens)
    with memit.apply_memit(model, tok, memit.requests_for(facts), Cs, hp):
        wins = [evaluation.score_edit(model, tok, f)["efficacy"] for f in facts]
    assert sum(wins) >= 2, wins
    assert data.known_facts(model, tok, facts) == facts, "undo must bring the true objects back"


# ----------------------------------------------------------------------------------- evaluation helpers


def test_ngram_entropy_is_zero_for_repetition_and_grows_with_variety():
    assert memit.ngram_entropy("the the the the the the") == 0.0
    varied = "the cat sat on the mat while a dog ran past the old red barn"
    assert memit.ngram_entropy(varied) > memit.ngram_entropy("the cat sat the cat sat the cat sat")
    # 15 distinct bigrams and 14 distinct trigrams in 16 words: (2/3·log2 15 + 4/3·log2 14) / 2
    words = "a b c d e f g h i j k l m n o p"
    import math
    assert abs(memit.ngram_entropy(words) - (2 / 3 * math.log2(15) + 4 / 3 * math.log2(14)) / 2) < 1e-9


def test_edit_order_mixes_relations_with_distinct_subjects():
    from engram_helpers import data

    facts = data.facts_in_split("test")
    order = memit.edit_order(facts)
    assert len({f.subject for f in order}) == len(order)  # distinct subjects
    assert len(data.relations(order[:7])) == 7               # the first facts mix the relations
    memit.check_requests(memit.requests_for(order))


def test_sequential_vs_batch_rejects_bad_counts(tiny, tok):
    hp = _hp()
    with pytest.raises(ValueError, match="counts must lie"):
        memit.sequential_vs_batch(tiny, tok, REQS, [0, 2], {}, hp, hp.value, [], [])
    with pytest.raises(ValueError, match="counts must lie"):
        memit.sequential_vs_batch(tiny, tok, REQS, [5], {}, hp, hp.value, [], [])
    with pytest.raises(ValueError, match="counts must lie"):
        memit.sequential_edits(tiny, tok, REQS, [], None, hp.value, lambda n, s: {})


@pytest.mark.slow
def test_isolated_edits_score_each_edit_alone_and_undo_it():
    """Two known facts: each edit is scored alone (as one edit then score_edit would score it) and undone."""
    from engram_helpers import data, evaluation, layer_stats

    model, tok = load_model()
    facts = [f for f in data.known_facts(model, tok) if f.relation == "capital_of"][:2]
    hp = rome.with_settings(rome.hparams_for(model), n_prefixes=1, v_steps=5)
    C = layer_stats.second_moment(model, tok, hp.layer, hp.cov_tokens, hp.cov_source)
    before = {n: p.clone() for n, p in model.named_parameters()}
    got = memit.isolated_edits(model, tok, facts, C, hp)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "every edit is undone"
    assert weights.active_changes(model) == []
    for i, f in enumerate(facts):
        with rome.edit(model, tok, memit.requests_for([f])[0], hparams=hp, C=C):
            alone = evaluation.score_edit(model, tok, f)
        assert [got[k][i] for k in ("efficacy", "paraphrase", "neighbourhood")] == \
            [alone[k] for k in ("efficacy", "paraphrase", "neighbourhood")]


@pytest.mark.slow
def test_sequential_edits_score_each_edit_when_made_and_undo_all():
    """Two known facts edited one after another: the first is scored as one edit alone would be, the second with
    both edits in; rows come at the counts asked for, with the when-made scores of the facts edited so far."""
    from engram_helpers import data, evaluation, layer_stats

    model, tok = load_model()
    facts = [f for f in data.known_facts(model, tok) if f.relation == "capital_of"][:2]
    hp = rome.with_settings(rome.hparams_for(model), n_prefixes=1, v_steps=5)
    C = layer_stats.second_moment(model, tok, hp.layer, hp.cov_tokens, hp.cov_source)
    before = {n: p.clone() for n, p in model.named_parameters()}
    rows = memit.sequential_edits(model, tok, facts, [2, 1], C, hp, lambda n, s: {"n": n, "seconds": s})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "every edit is undone"
    assert [r["n"] for r in rows] == [1, 2] and rows[0]["seconds"] <= rows[1]["seconds"]
    assert len(rows[0]["when_made"]["efficacy"]) == 1 and len(rows[1]["when_made"]["efficacy"]) == 2
    keys = ("efficacy", "paraphrase", "neighbourhood")
    first, second = memit.requests_for(facts)
    with rome.edit(model, tok, first, hparams=hp, C=C):
        alone = evaluation.score_edit(model, tok, facts[0])
        with rome.edit(model, tok, second, hparams=hp, C=C):
            both = evaluation.score_edit(model, tok, facts[1])
    assert [rows[1]["when_made"][k][0] for k in keys] == [alone[k] for k in keys]
    assert [rows[1]["when_made"][k][1] for k in keys] == [both[k] for k in keys]

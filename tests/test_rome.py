"""engram_helpers.rome: the rank-one update, exact undo, the second moment C, bad input, and a real edit."""

from __future__ import annotations

import time

import pytest
import torch

from engram_helpers import data, rome
from engram_helpers.models import mlp_out_weight, next_token_probs, first_token_id


def _problem(seed=0, d_out=6, d_in=9):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    k, v = torch.randn(d_in, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    return W, k, v, A @ A.T / 40


def test_rank_one_update_writes_the_value_and_spares_orthogonal_keys():
    W, k, v, C = _problem()
    delta = rome.rank_one_update(W, k, v, C)
    assert torch.linalg.matrix_rank(delta) == 1
    assert torch.allclose((W + delta) @ k, v, atol=1e-10)
    # keys that are C⁻¹-orthogonal to k (xᵀ C⁻¹ k = 0) are left unchanged
    u = torch.linalg.solve(C, k)
    x = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x - (x @ u) / (u @ u) * u
    assert torch.allclose(delta @ x, torch.zeros(6, dtype=torch.float64), atol=1e-10)


def test_identity_update_is_hebbian_plus_anti_hebbian():
    W, k, v, _ = _problem(2)
    expected = (rome.hebbian_update(k, v) - torch.outer(W @ k, k)) / (k @ k)
    assert torch.allclose(rome.rank_one_update(W, k, v, None), expected, atol=1e-12)
    assert torch.allclose(rome.hebbian_update(k, v, 0.5), 0.5 * torch.outer(v, k))


def test_rank_one_update_rejects_wrong_shapes():
    W, k, v, C = _problem()
    with pytest.raises(ValueError, match="Shapes"):
        rome.rank_one_update(W, v, k, C)


def test_undo_restores_weights_bit_for_bit_in_reverse_order(tiny_model):
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    shape = mlp_out_weight(tiny_model, 1).shape
    h1 = rome.apply_update(tiny_model, 1, torch.randn(shape) * 0.1)
    h2 = rome.apply_update(tiny_model, 1, torch.randn(shape) * 0.1)
    h3 = rome.apply_update(tiny_model, 2, torch.randn(mlp_out_weight(tiny_model, 2).shape))
    with pytest.raises(RuntimeError, match="reverse order"):
        h1.undo()  # h2 on the same layer is still applied
    h3.undo()
    h2.undo()
    h1.undo()
    h1.undo()  # a second undo does nothing
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_context_manager_and_undo_all(tiny_llama):
    w0 = mlp_out_weight(tiny_llama, 0).clone()
    delta = torch.full(w0.shape, 1e-3)
    with rome.apply_update(tiny_llama, 0, delta):
        assert not torch.equal(mlp_out_weight(tiny_llama, 0), w0)
    assert torch.equal(mlp_out_weight(tiny_llama, 0), w0)
    rome.apply_update(tiny_llama, 0, delta)
    rome.apply_update(tiny_llama, 0, delta)
    assert rome.undo_all(tiny_llama) == 2
    assert torch.equal(mlp_out_weight(tiny_llama, 0), w0)


def test_gpt2_conv1d_update_lands_in_the_weight(tiny_gpt2):
    W = mlp_out_weight(tiny_gpt2, 0)
    delta = torch.randn(W.shape)
    w0 = W.clone()
    with rome.apply_update(tiny_gpt2, 0, delta):
        assert torch.allclose(mlp_out_weight(tiny_gpt2, 0), w0 + delta)
    assert torch.equal(mlp_out_weight(tiny_gpt2, 0), w0)


def test_bad_input_errors_clearly(default_model):
    model, tok = default_model
    with pytest.raises(ValueError, match="'Big Ben' does not occur"):
        rome.apply_rome(model, tok, "The Eiffel Tower is in", "Big Ben", "Rome", C="identity")
    with pytest.raises(ValueError, match="empty"):
        rome.apply_rome(model, tok, "The Eiffel Tower is in", "The Eiffel Tower", "   ", C="identity")
    with pytest.raises(IndexError, match="layers 0..29"):
        rome.apply_rome(model, tok, "The Eiffel Tower is in", "The Eiffel Tower", "Rome", layer=30, C="identity")
    with pytest.raises(ValueError, match="Unknown source"):
        rome.second_moments(model, tok, [3], 100, source="wikipedia-offline")
    with pytest.raises(ValueError, match="non-empty"):
        rome.evaluate(model, tok, [])


def test_subject_last_index_and_key_shape(default_model):
    model, tok = default_model
    from engram_helpers.models import encode

    text = "Because it rained. The Eiffel Tower is located in"
    i = rome.subject_last_index(tok, text, "The Eiffel Tower")
    ids = encode(tok, text)[0]["input_ids"][0]
    assert tok.decode(ids[: i + 1]).endswith("The Eiffel Tower")
    k = rome.compute_key(model, tok, "The Eiffel Tower is located in", "The Eiffel Tower", 4, ["I think"])
    assert k.shape == (mlp_out_weight(model, 4).shape[1],)


def test_prefixes_are_seeded_and_cached(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    model, tok = default_model
    a = rome.context_prefixes(model, tok, n=2, length=4, seed=3)
    files = list((tmp_path / "rome").glob("prefixes-*.json"))
    assert len(files) == 1
    files[0].unlink()
    assert rome.context_prefixes(model, tok, n=2, length=4, seed=3) == a  # regenerated: same text
    assert len(a) == 2 and all(a)


def test_second_moment_is_spd_and_cached(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    model, tok = default_model
    sm = rome.second_moments(model, tok, [3, 5], n_tokens=2500)
    assert set(sm) == {3, 5}
    for layer, m in sm.items():
        assert m.n_tokens == 2500 and m.C.shape == (1536, 1536)
        assert torch.equal(m.C, m.C.T)
        assert m.is_spd(), f"C at layer {layer} is not positive definite"
        assert 1 < m.cond() < 1e9
    files = sorted(p.name for p in (tmp_path / "rome" / "second_moment").rglob("*.pt"))
    assert files == ["bbc-2500-layer3.pt", "bbc-2500-layer5.pt"]
    t = time.perf_counter()
    again = rome.second_moment(model, tok, 3, n_tokens=2500)
    assert time.perf_counter() - t < 2, "the cached C should load, not be recomputed"
    assert torch.equal(again.C, sm[3].C)


def test_edit_flips_a_known_fact_and_undo_is_exact(default_model):
    model, tok = default_model
    fact = data.load_facts()[0]  # The Eiffel Tower ... Paris -> Rome
    assert fact in data.known_facts(model, tok, [fact]), "the model should know the Eiffel Tower fact"
    C = rome.second_moment(model, tok, 4, n_tokens=3000)
    w0 = mlp_out_weight(model, 4).clone()
    cpu = time.process_time()
    handle = rome.apply_rome(model, tok, fact.prompt, fact.subject, fact.target_new, C=C)
    cpu = (time.process_time() - cpu) / max(1, torch.get_num_threads())
    try:
        # CPU seconds per thread, not wall time: other processes on a shared machine must not fail the test
        assert cpu < 30, f"one edit took {cpu:.1f} CPU seconds per thread; it should take well under 30 s"
        top = int(next_token_probs(model, tok, fact.prompt).argmax())
        assert top == first_token_id(tok, fact.target_new), tok.decode([top])
        v = handle.value
        assert torch.allclose(mlp_out_weight(model, 4) @ handle.key, v, atol=1e-3 * v.norm())
    finally:
        handle.undo()
    assert torch.equal(mlp_out_weight(model, 4), w0)
    top = int(next_token_probs(model, tok, fact.prompt).argmax())
    assert top == first_token_id(tok, fact.target_true)


def test_evaluate_counts_and_unedited_neighbourhood(default_model):
    model, tok = default_model
    facts = data.known_facts(model, tok)[:2]
    hp = rome.HParams(layer=4, n_prefixes=1)
    for f in facts:  # specificity is measured on prompts that were not edited: other subjects
        assert all(f.subject not in p for p in f.neighbourhood)
    ev = rome.evaluate(model, tok, facts, hparams=hp, C="identity", methods=("identity",))
    n_para = sum(len(f.paraphrases) for f in facts)
    n_neigh = sum(len(f.neighbourhood) for f in facts)
    assert ev.summary["identity"]["efficacy"][1] == len(facts)
    assert ev.summary["identity"]["paraphrase"][1] == n_para
    assert ev.summary["identity"]["neighbourhood"][1] == n_neigh
    assert ev.summary["unedited"]["efficacy"][0] == 0  # known facts: the true object wins before the edit
    assert ev.summary["identity"]["efficacy"][0] >= 1
    assert all(r["neighbourhood_kl"] >= 0 for r in ev.rows)

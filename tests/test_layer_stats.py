"""engram_helpers.layer_stats: C = E[k kᵀ] for several layers in one pass, exact, cached, with the pass
stopped after the last layer needed."""

from __future__ import annotations

import time

import pytest
import torch

from engram_helpers import layer_stats
from engram_helpers.hooks import trace
from engram_helpers.models import arch, encode


def test_second_moments_equal_a_direct_computation_and_stop_early(default_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    model, tok = default_model
    n = 600
    last_layer_calls = []
    top = arch(model).n_layers - 1
    handle = model.get_submodule(arch(model).layer_name(top)).register_forward_hook(
        lambda *a: last_layer_calls.append(1))
    try:
        sm = layer_stats.second_moments(model, tok, [3, 5], n_tokens=n, seq_len=32)
    finally:
        handle.remove()
    assert not last_layer_calls, "the pass should stop after layer 5, not run the whole model"
    assert "computed [3, 5] in one pass" in capsys.readouterr().out
    # direct: the same texts, tokens and positions, one layer at a time
    texts = list(layer_stats.texts("bbc", model, tok))[:40]
    keys = {3: [], 5: []}
    count = 0
    for s in range(0, len(texts), 8):
        batch, _ = encode(tok, texts[s:s + 8])
        batch = {k: v[:, :33] for k, v in batch.items()}
        valid = batch["attention_mask"].bool().clone()
        valid[:, 0] = False
        keep = valid.flatten().nonzero()[:, 0][: n - count]
        for layer in keys:
            with torch.no_grad(), trace(model, arch(model).mlp_out_name(layer), retain_input=True) as t:
                model(**batch)
            keys[layer].append(t.input.reshape(-1, t.input.shape[-1])[keep])
        count += len(keep)
        if count >= n:
            break
    for layer, m in sm.items():
        K = torch.cat(keys[layer])
        assert m.n_tokens == n == len(K)
        assert torch.allclose(m.C, K.T @ K / n, rtol=1e-4, atol=1e-5)
        assert torch.equal(m.C, m.C.T)  # (600 tokens < 1536 dimensions: C is singular here, so no SPD check)
    t = time.perf_counter()
    again = layer_stats.second_moment(model, tok, 3, n_tokens=n, seq_len=32)
    assert time.perf_counter() - t < 2, "the cached C should load, not be recomputed"
    assert torch.equal(again.C, sm[3].C)
    assert len(list(tmp_path.rglob("*.pt"))) == 2


def test_bad_input(default_model):
    model, tok = default_model
    with pytest.raises(ValueError, match="Unknown source"):
        layer_stats.second_moments(model, tok, [3], 100, source="wikipedia-offline")
    with pytest.raises(IndexError, match="layers 0..29"):
        layer_stats.second_moments(model, tok, [30], 100)
    with pytest.raises(ValueError, match="No layers"):
        layer_stats.second_moments(model, tok, [], 100)

"""Tests for engram_helpers.grafting and engram_helpers.textdata (tiny BERT built from a config; real data files)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertModel

from engram_helpers import grafting as G
from engram_helpers import stats, weights
from engram_helpers import textdata as T


def tiny_classifier(seed: int = 0) -> G.CosineClassifier:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    enc = BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)
    return G.CosineClassifier(enc, torch.randn(2, 32, generator=torch.Generator().manual_seed(seed)), scale=10.0)


def toy_task(n: int, seed: int) -> G.Batches:
    """Label 1 iff most tokens come from 10..29 rather than 30..49: a skill the tiny model has to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    low = torch.randint(10, 30, (n, 8), generator=g)
    high = torch.randint(30, 50, (n, 8), generator=g)
    pick_low = torch.rand(n, 8, generator=g) < torch.where(labels == 1, 0.7, 0.3).unsqueeze(1)
    ids = torch.where(pick_low, low, high)
    mask = torch.ones_like(ids)
    return G.Batches(list(ids.split(16)), list(mask.split(16)), list(labels.split(16)))


@pytest.fixture(scope="module")
def tuned():
    model = tiny_classifier()
    names = G.graftable_names(model)
    pre = G.snapshot(model, names)
    train, test = toy_task(256, 0), toy_task(256, 1)
    ft = G.finetune(model, train, names, steps=400, lr=0.3, seed=0)
    return model, names, pre, ft, G.difference(ft, pre), train, test


def test_graftable_names_are_layer_parameters_only(tuned):
    model, names, *_ = tuned
    assert names and all(".layer." in n for n in names)
    assert not any("embeddings" in n for n in names)
    with pytest.raises(ValueError, match="pattern"):
        G.graftable_names(model, r"nothing-matches")


def test_finetune_learns_and_leaves_model_unchanged(tuned):
    model, names, pre, ft, delta, train, test = tuned
    now = G.snapshot(model, names)
    assert all(torch.equal(now[n], pre[n]) for n in names), "finetune must restore the model's values"
    before, after = G.accuracy(model, test), G.accuracy(model, test, ft)
    assert after > before + 0.15 and after > 0.75, (before, after)


def test_finetune_is_seeded(tuned):
    model, names, pre, ft, *_ = tuned
    again = G.finetune(model, toy_task(256, 0), names, steps=400, lr=0.3, seed=0)
    assert all(torch.equal(again[n], ft[n]) for n in names)


def test_graft_extremes_are_exact(tuned):
    model, names, pre, ft, delta, *_ = tuned
    zero = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in pre.items()}
    one = {n: torch.ones_like(t, dtype=torch.bool) for n, t in pre.items()}
    assert all(torch.equal(G.graft(pre, delta, zero)[n], pre[n]) for n in names)
    assert all(torch.equal(G.graft(pre, delta, {})[n], pre[n]) for n in names)
    assert all(torch.equal(G.graft(pre, delta, one)[n], pre[n] + delta[n]) for n in names)
    assert all(torch.allclose(G.graft(pre, delta, one)[n], ft[n], atol=1e-6) for n in names)
    half = {n: torch.full_like(t, 0.5) for n, t in pre.items()}
    assert all(torch.allclose(G.graft(pre, delta, half)[n], (pre[n] + ft[n]) / 2, atol=1e-6) for n in names)
    with pytest.raises(ValueError, match="shape"):
        G.graft(pre, delta, {names[0]: torch.ones(3, dtype=torch.bool)})


@pytest.mark.parametrize("k", [0, 1, 17, 500])
def test_masks_have_exactly_the_asked_size(tuned, k):
    _, _, pre, _, delta, *_ = tuned
    assert G.mask_size(G.base_patch(delta, k)) == k
    assert G.mask_size(G.random_mask(pre, k, seed=1)) == k
    ties = {n: torch.zeros_like(t) for n, t in pre.items()}
    assert G.mask_size(G.binarize_topk(ties, k)) == k


def test_base_patch_is_the_largest_changes(tuned):
    _, _, _, _, delta, *_ = tuned
    mask = G.base_patch(delta, 50)
    inside = torch.cat([delta[n].abs()[mask[n]] for n in delta])
    outside = torch.cat([delta[n].abs()[~mask[n]] for n in delta])
    assert inside.min() >= outside.max()


def test_random_mask_is_seeded_and_spread(tuned):
    _, _, pre, *_ = tuned
    a, b, c = G.random_mask(pre, 200, 0), G.random_mask(pre, 200, 0), G.random_mask(pre, 200, 1)
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], c[n]) for n in a)


def test_lesion_resets_only_the_region(tuned):
    _, names, pre, ft, delta, *_ = tuned
    region = G.base_patch(delta, 100)
    out = G.lesion(ft, pre, region)
    for n in names:
        assert torch.equal(out[n][region[n]], pre[n][region[n]])
        assert torch.equal(out[n][~region[n]], ft[n][~region[n]])
    # lesioning the graft region of the fine-tuned model equals grafting its complement
    comp = G.complement(region, pre)
    assert all(torch.allclose(out[n], G.graft(pre, delta, comp)[n], atol=1e-6) for n in names)
    with pytest.raises(ValueError, match="boolean"):
        G.lesion(ft, pre, {names[0]: region[names[0]].float()})


def test_end_to_end_graft_beats_random_and_lesion_hurts(tuned):
    model, names, pre, ft, delta, train, test = tuned
    zs, fa = G.accuracy(model, test), G.accuracy(model, test, ft)
    k = G.size_for(pre, 0.05)
    S = G.train_mask(model, pre, delta, train, k, steps=40, lr=1e3, seed=0)
    trained = G.binarize_topk(S, k)
    assert G.mask_size(trained) == k
    grafted = G.accuracy(model, test, G.graft(pre, delta, trained))
    rand = G.accuracy(model, test, G.graft(pre, delta, G.random_mask(pre, k, 0)))
    assert grafted > rand + 0.1, (zs, fa, grafted, rand)
    lesioned = G.accuracy(model, test, G.lesion(ft, pre, trained))
    rand_lesion = G.accuracy(model, test, G.lesion(ft, pre, G.random_mask(pre, k, 0)))
    assert lesioned < rand_lesion, (lesioned, rand_lesion)
    thr = G.binarize_threshold(S)
    assert all(torch.equal(thr[n], S[n] > 0) for n in S)


def test_frozen_region_does_not_move(tuned):
    model, names, pre, ft, delta, train, _ = tuned
    region = G.base_patch(delta, 300)
    out = G.finetune(model, toy_task(64, 5), names, steps=10, lr=0.5, seed=1, start=ft, frozen=region)
    for n in names:
        assert torch.equal(out[n][region[n]], ft[n][region[n]])
    assert any(not torch.equal(out[n], ft[n]) for n in names)


def test_set_values_writes_a_graft_into_the_model_and_restores(tuned):
    """Writing a graft into the model (e.g. for generate) goes through weights.set_values and restores exactly."""
    model, names, pre, ft, delta, _, test = tuned
    region = G.base_patch(delta, 40)
    grafted = G.graft(pre, delta, region)
    with weights.set_values(model, grafted, label="graft"):
        assert torch.equal(dict(model.named_parameters())[names[0]], grafted[names[0]])
        assert G.accuracy(model, test) == G.accuracy(model, test, grafted)
    assert all(torch.equal(dict(model.named_parameters())[n], pre[n]) for n in names)


def test_few_shot_setting_is_the_one_source():
    s = G.FewShot()
    assert (s.shots, s.steps, s.lr) == (64, 64, 0.01)
    with pytest.raises(Exception):
        s.lr = 0.05  # frozen: a notebook cannot change the shared setting in place
    assert dataclasses.replace(s, n_test=50).lr == 0.01
    with pytest.raises(ValueError, match="lr > 0"):
        G.FewShot(lr=0.0)


def test_sentiment_setup_runs_the_setting_on_the_real_encoder():
    enc, tok = G.load_encoder()
    setting = G.FewShot(shots=4, n_test=8, steps=2, batch_size=4)
    a = G.sentiment_setup(setting, seed=1, encoder=enc, tok=tok)
    assert a.setting == setting and a.train.n_examples == 8 and a.test.n_examples == 16
    assert set(a.delta) == set(a.names)
    assert all(torch.allclose(a.theta_pre[n] + a.delta[n], a.theta_ft[n], atol=1e-6) for n in a.names)
    assert any(a.delta[n].abs().max() > 0 for n in a.names)
    now = G.snapshot(a.model, a.names)
    assert all(torch.equal(now[n], a.theta_pre[n]) for n in a.names), "the model keeps its pretrained values"
    b = G.sentiment_setup(setting, seed=1, encoder=enc, tok=tok)
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.names), "seeded"
    with pytest.raises(ValueError, match="both"):
        G.sentiment_setup(setting, encoder=enc)


def test_correct_and_paired_difference_use_the_course_bootstrap(tuned):
    model, names, pre, ft, delta, _, test = tuned
    c = G.correct(model, test, ft)
    assert c.dtype == torch.bool and c.double().mean().item() == pytest.approx(G.accuracy(model, test, ft))
    est = G.accuracy_difference(model, test, ft, None)
    assert isinstance(est, stats.Estimate) and est.n == c.numel()
    assert est.mean == pytest.approx(G.accuracy(model, test, ft) - G.accuracy(model, test))
    assert est.lo <= est.mean <= est.hi and 0 < est.hi - est.lo < 0.3
    same = stats.bootstrap((c.double() - G.correct(model, test).double()).numpy())
    assert (same.mean, same.lo, same.hi) == (est.mean, est.lo, est.hi), "one bootstrap: stats.bootstrap"
    zero = G.accuracy_difference(model, test, ft, ft)
    assert (zero.mean, zero.lo, zero.hi) == (0.0, 0.0, 0.0)
    assert not hasattr(G, "bootstrap_ci"), "the duplicate bootstrap is gone"


def test_layer_budget_patch_spreads_the_budget(tuned):
    _, names, pre, _, delta, *_ = tuned
    layers = sorted({G.param_layer(n) for n in names})
    for k in (1, 7, 100, 1001):
        mask = G.layer_budget_patch(delta, k)
        assert set(mask) == set(delta) and G.mask_size(mask) == k
        per_layer = [sum(int(mask[n].sum()) for n in names if G.param_layer(n) == layer) for layer in layers]
        assert max(per_layer) - min(per_layer) <= 1 and per_layer == sorted(per_layer, reverse=True)
        for layer in layers:  # inside a layer: the largest |δ| of that layer
            inside = [n for n in names if G.param_layer(n) == layer]
            chosen = torch.cat([delta[n].abs()[mask[n]] for n in inside])
            rest = torch.cat([delta[n].abs()[~mask[n]] for n in inside])
            assert chosen.numel() == 0 or rest.numel() == 0 or chosen.min() >= rest.max()
    with pytest.raises(ValueError, match="layer number"):
        G.layer_budget_patch({"head.weight": torch.ones(3)}, 1)
    with pytest.raises(ValueError, match="k must lie"):
        G.layer_budget_patch(delta, G.n_params(delta) + 1)


def test_region_summary_shares(tuned):
    _, _, pre, _, delta, *_ = tuned
    rows = G.region_summary(G.base_patch(delta, 123))
    assert abs(sum(r["share_of_region"] for r in rows) - 1) < 1e-9
    assert abs(sum(r["share_of_params"] for r in rows) - 1) < 1e-9
    assert sum(r["count"] for r in rows) == 123
    assert set(G.group_summary(rows, "layer")) == {0, 1}


def test_recovery():
    assert G.recovery(0.8, 0.7, 0.9) == pytest.approx((0.8 / 0.9, 0.5))
    with pytest.raises(ValueError):
        G.recovery(0.8, 0.9, 0.9)


def test_tweets_and_bbc_load_offline():
    tweets = T.load_tweets()
    assert tweets.label_names == ("negative", "positive") and len(tweets) > 10_000
    assert len({t.lower() for t in tweets.texts}) == len(tweets)
    bbc = T.load_bbc()
    assert len(bbc.label_names) == 5 and 2000 < len(bbc) <= 2225
    train, test = T.split(tweets, 8, 20, seed=3)
    assert sorted(train.labels) == [0] * 8 + [1] * 8 and len(test) == 40
    assert not set(train.texts) & set(test.texts)
    assert T.split(tweets, 8, 20, seed=3) == (train, test)
    with pytest.raises(ValueError, match="fewer"):
        T.split(bbc, 400, 200)


def test_real_encoder_zero_shot_above_chance():
    enc, tok = G.load_encoder()
    assert sum(p.numel() for p in enc.parameters()) == 22_713_216
    tweets = T.load_tweets()
    _, test = T.split(tweets, 1, 100, seed=0)
    model = G.label_classifier(enc, tok, ["This is terrible.", "This is great!"])
    assert G.accuracy(model, G.tokenize(tok, test.texts, test.labels)) > 0.6

"""engram_helpers.checks.rome: each check passes the reference and fails known-wrong implementations."""

from __future__ import annotations

import pytest
import torch

from engram_helpers import evaluation, rome, weights
from engram_helpers.checks import CheckFailed
from engram_helpers.checks import rome as checks
from engram_helpers.hooks import trace
from engram_helpers.models import arch, encode
from engram_helpers.query import contexts, subject_last


def _key_from(model, tok, query, layer, prefixes, *, output=False, use_prefixes=True,
              position="subject_last", reduce="mean", search=False):
    qs = contexts(query, prefixes) if use_prefixes else [query]
    texts = [q.prompt for q in qs]
    batch, last = encode(tok, texts)
    if position == "last":
        pos = last
    elif search:  # the old way: find the subject's first occurrence in the filled text
        pos = torch.tensor([len(encode(tok, t[:t.find(query.subject) + len(query.subject)])[0]["input_ids"][0]) - 1
                            for t in texts])
    else:
        pos = torch.tensor([subject_last(tok, q) for q in qs])
    with torch.no_grad(), trace(model, arch(model).mlp_out_name(layer), retain_input=True) as t:
        model(**batch)
    x = (t.output if output else t.input)[torch.arange(len(texts)), pos]
    return x.mean(0) if reduce == "mean" else x.sum(0)


def test_key_check_passes_reference_and_a_hand_written_solution(default_model):
    model, tok = default_model
    checks.check_compute_key(rome.compute_key, model, tok)
    checks.check_compute_key(_key_from, model, tok)


@pytest.mark.parametrize("wrong, hint", [
    (dict(output=True), "input"),
    (dict(use_prefixes=False), "prefix"),
    (dict(position="last"), "subject's LAST token"),
    (dict(search=True), "searched the text"),
    (dict(reduce="sum"), "mean"),
])
def test_key_check_catches_mistakes(default_model, wrong, hint):
    model, tok = default_model
    with pytest.raises(CheckFailed, match=hint):
        checks.check_compute_key(lambda *a: _key_from(*a, **wrong), model, tok)


def test_key_check_rejects_non_tensor(default_model):
    model, tok = default_model
    with pytest.raises(CheckFailed, match="torch.Tensor"):
        checks.check_compute_key(lambda *a: [0.0], model, tok)


def test_rank_one_check_passes_reference():
    checks.check_rank_one_update(rome.rank_one_update)


@pytest.mark.parametrize("wrong, hint", [
    (lambda W, k, v, C: torch.outer(v - W @ k, k) / (k @ k), "ignores C"),
    (lambda W, k, v, C: torch.outer(v - W @ k, C @ k) / ((C @ k) @ k), "solve"),
    (lambda W, k, v, C: torch.outer(v, torch.linalg.solve(C, k)) / (torch.linalg.solve(C, k) @ k), "anti-Hebbian"),
    (lambda W, k, v, C: torch.outer(v - W @ k, torch.linalg.solve(C, k)), "denominator"),
    (lambda W, k, v, C: torch.outer(torch.linalg.solve(C, k), v - W @ k), "transpose"),
    (lambda W, k, v, C: torch.outer(v - W @ k, torch.linalg.solve(C, k)) / (k @ k), r"\(W \+ ΔW\) k should equal v"),
])
def test_rank_one_check_catches_mistakes(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.check_rank_one_update(wrong)


def test_hebbian_check():
    checks.check_hebbian_update(rome.hebbian_update)
    with pytest.raises(CheckFailed, match="transposed"):
        checks.check_hebbian_update(lambda k, v, eta: eta * torch.outer(k, v))
    with pytest.raises(CheckFailed, match="η is missing"):
        checks.check_hebbian_update(lambda k, v, eta: torch.outer(v, k))
    with pytest.raises(CheckFailed, match="outer product"):
        checks.check_hebbian_update(lambda k, v, eta: eta * (v[:3] @ k[:3]).reshape(1))
    with pytest.raises(CheckFailed):
        checks.check_hebbian_update(lambda k, v, eta: eta * torch.outer(v, k) + 1.0)


def _edit_at_layers(model, tok, facts, layers, hparams, Cs):
    return evaluation.evaluate_layers(model, tok, facts, layers, hparams, Cs)


def _ignores_layers(model, tok, facts, layers, hparams, Cs):  # every edit at hparams.layer
    return {l: evaluation.evaluate(model, tok, facts, hparams=hparams, C=Cs[l], unedited=False) for l in layers}


def _never_undone(model, tok, facts, layers, hparams, Cs):  # edits left in the model
    out = {}
    for l in layers:
        hp = rome.with_settings(hparams, layer=l)
        rows = []
        for f in facts:
            rome.apply_rome(model, tok, f.query(f.target_new), hparams=hp, C=Cs[l])
            rows.append({"fact": f.id, "layer": l, "method": "rome", **evaluation.score_edit(model, tok, f)})
        out[l] = evaluation.Evaluation(rows)
    return out


def _first_fact_only(model, tok, facts, layers, hparams, Cs):
    return _edit_at_layers(model, tok, facts[:1], layers, hparams, Cs)


def test_edit_at_layers_check_passes_the_reference(default_model):
    model, tok = default_model
    checks.check_edit_at_layers(_edit_at_layers, model, tok)


@pytest.mark.parametrize("wrong, hint", [
    (_ignores_layers, "were made at layer"),
    (_never_undone, "differ from before"),
    (_first_fact_only, "one 'rome' row per fact"),
    (lambda *a: [], "one entry per requested layer"),
])
def test_edit_at_layers_check_catches_mistakes_and_restores_the_model(default_model, wrong, hint):
    model, tok = default_model
    a = arch(model)
    before = [model.get_submodule(a.mlp_out_name(l)).weight.clone() for l in range(a.n_layers)]
    active = weights.active_changes(model)
    with pytest.raises(CheckFailed, match=hint):
        checks.check_edit_at_layers(wrong, model, tok)
    assert all(torch.equal(model.get_submodule(a.mlp_out_name(l)).weight, w) for l, w in enumerate(before))
    assert weights.active_changes(model) == active, "edits left applied must be undone, not only overwritten"

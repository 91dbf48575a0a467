"""engram_helpers.evaluation: CounterFact-style scores with the paper's magnitudes, intervals and splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram_helpers import data, evaluation, rome
from engram_helpers.models import answer_token_logprobs, mlp_out_weight, next_token_probs


def test_split_is_disjoint_complete_and_covers_every_relation():
    facts = data.load_facts()
    dev, test = data.facts_in_split("dev", facts), data.facts_in_split("test", facts)
    assert not {f.id for f in dev} & {f.id for f in test}
    assert len(dev) + len(test) == len(facts)
    assert {f.relation for f in dev} == {f.relation for f in test} == set(data.relations(facts))
    assert data.facts_in_split("dev") == dev  # seeded: the same every time
    with pytest.raises(ValueError, match="'dev'"):
        data.facts_in_split("train", facts)


def test_score_edit_follows_the_papers_definitions(default_model):
    model, tok = default_model
    f = data.known_facts(model, tok)[0]
    s = evaluation.score_edit(model, tok, f)
    prompts = [f.prompt, *f.paraphrases, *f.neighbourhood]

    def p(answer):  # exp(-mean token NLL), as in the authors' experiments/summarize.py
        return np.array([float(lp.mean().exp())
                         for lp in answer_token_logprobs(model, tok, prompts, [answer] * len(prompts))])

    new, true = p(f.target_new), p(f.target_true)
    n = len(f.paraphrases)
    assert s["efficacy"] == float(new[0] > true[0])
    assert np.isclose(s["efficacy_mag"], new[0] - true[0])
    assert np.isclose(s["paraphrase"], np.mean(new[1:1 + n] > true[1:1 + n]))
    assert np.isclose(s["paraphrase_mag"], np.mean(new[1:1 + n] - true[1:1 + n]))
    assert np.isclose(s["neighbourhood_mag"], np.mean(true[1 + n:] - new[1 + n:]))
    assert s["efficacy"] == 0.0, "a known fact: the true object wins before any edit"
    # the neighbourhood's next-token distributions come out of the same forward pass as the scores
    _, nxt = evaluation._score_and_next(model, tok, f)
    assert torch.allclose(nxt, next_token_probs(model, tok, list(f.neighbourhood)), atol=1e-5)


def test_evaluate_scores_unedited_and_edited_and_undoes(default_model):
    model, tok = default_model
    facts = data.known_facts(model, tok)[:2]
    hp = rome.with_settings(rome.hparams_for(model), n_prefixes=1)
    w0 = mlp_out_weight(model, hp.layer).clone()
    ev = evaluation.evaluate(model, tok, facts, hparams=hp, C="identity", methods=("identity",))
    assert ev.methods == ["unedited", "identity"]
    assert torch.equal(mlp_out_weight(model, hp.layer), w0), "every edit is undone"
    assert list(ev.values("unedited", "efficacy")) == [0.0, 0.0]
    assert ev.values("identity", "efficacy_mag").mean() > ev.values("unedited", "efficacy_mag").mean()
    e = ev.estimate("identity", "paraphrase_mag")
    assert e.n == 2 and e.lo <= e.mean <= e.hi
    assert all(r["neighbourhood_kl"] >= 0 for r in ev.rows)
    assert "efficacy_mag" in ev.table()
    with pytest.raises(ValueError, match="non-empty"):
        evaluation.evaluate(model, tok, [])
    with pytest.raises(ValueError, match="Unknown methods"):
        evaluation.evaluate(model, tok, facts, methods=("memit",))

def test_paired_differences_match_facts_and_refuse_misaligned_rows():
    def rows(method: str, facts: list[int], values: list[float]) -> list[dict]:
        return [{"fact": f, "method": method, "neighbourhood": v} for f, v in zip(facts, values)]

    ev = evaluation.Evaluation(rows("unedited", [3, 5], [1.0, 0.5]) + rows("rome", [3, 5], [0.5, 0.5]))
    np.testing.assert_array_equal(ev.paired("neighbourhood"), [-0.5, 0.0])  # after the edit minus before
    other = evaluation.Evaluation(rows("rome", [3, 5], [0.25, 1.0]))
    np.testing.assert_array_equal(ev.paired("neighbourhood", minus=other), [0.25, -0.5])
    swapped = evaluation.Evaluation(rows("rome", [5, 3], [1.0, 0.25]))
    with pytest.raises(ValueError, match="not the same facts"):
        ev.paired("neighbourhood", minus=swapped)
    with pytest.raises(ValueError, match="No rows for method 'identity'"):
        ev.paired("neighbourhood", method="identity")

def test_committed_results_are_found_inside_a_clone_and_none_outside(tmp_path, monkeypatch):
    # a committed result is found from a notebook's folder inside a clone, and is None outside one (Colab)
    results = tmp_path / "clone" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "r.json").write_text(json.dumps({"n": 3}), encoding="utf-8")
    (tmp_path / "clone" / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "clone" / "notebooks")
    assert evaluation.committed_result("r.json") == {"n": 3}
    assert evaluation.committed_result("missing.json") is None
    monkeypatch.chdir(tmp_path)
    assert evaluation.committed_result("r.json") is None

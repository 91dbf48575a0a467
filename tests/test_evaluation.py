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


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    x = np.random.default_rng(0).normal(size=50)
    e = evaluation.bootstrap(x, seed=1)
    assert e.lo < e.mean < e.hi and e.n == 50
    assert e == evaluation.bootstrap(x, seed=1)
    assert abs((e.hi - e.lo) - 2 * 1.96 * x.std() / np.sqrt(50)) < 0.2  # about the normal-theory width
    assert evaluation.bootstrap([1.0, 1.0, 1.0]).lo == 1.0
    with pytest.raises(ValueError, match="No values"):
        evaluation.bootstrap([])


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


def test_tracing_predicts_editing_finds_a_real_predictor_and_not_a_fake_one():
    rng = np.random.default_rng(0)
    n_facts, n_layers = 20, 6
    layer_effect = np.linspace(0.2, 0.8, n_layers)
    E = rng.uniform(0, 1, size=(n_facts, n_layers))
    noise = 0.05 * rng.normal(size=(n_facts, n_layers))
    real = evaluation.tracing_predicts_editing(layer_effect + 0.5 * E + noise, E, n_boot=200, n_perm=200)
    fake = evaluation.tracing_predicts_editing(layer_effect + noise, E, n_boot=200, n_perm=200)
    against = evaluation.tracing_predicts_editing(layer_effect - 0.5 * E + noise, E, n_boot=200, n_perm=200)
    assert real["gain"] > 0.3 and real["gain_ci"][0] > 0.1 and real["r2_both"] > 0.9
    assert real["gain_p"] == 1 / 201 and 0.4 < real["slope_ci"][0] < real["slope"] < real["slope_ci"][1] < 0.6
    assert against["gain_p"] == 1 / 201 and -0.6 < against["slope_ci"][0] < against["slope_ci"][1] < -0.4
    # a fake predictor: the in-sample gain is still positive (its interval cannot show chance), the
    # permutation test does, and the slope's interval contains zero
    assert 0 < fake["gain"] < 0.05 and fake["gain_ci"][0] >= -1e-12
    assert fake["gain_p"] > 0.05 and fake["slope_ci"][0] < 0 < fake["slope_ci"][1]
    assert fake["r2_layer"] > 0.9 and real["r2_layer"] < fake["r2_layer"]
    assert real == evaluation.tracing_predicts_editing(layer_effect + 0.5 * E + noise, E, n_boot=200, n_perm=200)
    with pytest.raises(ValueError, match="facts, layers"):
        evaluation.tracing_predicts_editing(np.zeros(5), np.zeros(5))


def test_sweep_matrices_reproduce_the_committed_hase_analysis():
    # The committed layer sweeps recorded Hase et al.'s analysis when they ran; read back from their per-layer
    # scores, the same fit gives the same numbers (the layers in the record's order, facts as rows).
    from importlib import resources

    folder = resources.files("engram_helpers").joinpath("hparams", "sweeps")
    sweeps = [json.loads(f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".json")]
    assert len(sweeps) >= 2, "both offline models have a committed sweep"
    for sweep in sweeps:
        Y, E = evaluation.sweep_matrices(sweep, "paraphrase_mag")
        assert Y.shape == E.shape == (len(sweep["fact_ids"]), len(sweep["layers"]))
        np.testing.assert_array_equal(Y[:, 1], sweep["per_layer"][str(sweep["layers"][1])]["paraphrase_mag"])
        h, recorded = evaluation.tracing_predicts_editing(Y, E), sweep["hase_paraphrase_mag"]
        for key in ("r2_layer", "r2_both", "gain", "r"):
            assert abs(h[key] - recorded[key]) < 1e-9, (sweep["model"], key)
        # the recorded choice, read back: the same means per layer, the same best layer, which is among the close
        totals, close = evaluation.sweep_totals(sweep)
        assert sorted(totals) == sorted(sweep["layers"])
        for layer, est in totals.items():
            assert abs(est.mean - sweep["score"][str(layer)]) < 1e-9 and est.lo <= est.mean <= est.hi
        assert max(totals, key=lambda l: totals[l].mean) == sweep["best_layer"] and sweep["best_layer"] in close
        assert all(totals[l].mean >= totals[sweep["best_layer"]].lo for l in close)
        assert [f.id for f in evaluation.sweep_facts(sweep)] == sweep["fact_ids"]
        # per-score estimates: every layer and score, and the three magnitudes' means add up to the total's
        est = evaluation.sweep_estimates(sweep)
        assert sorted(est) == sorted(sweep["layers"])
        assert all(sorted(e) == sorted(evaluation.METRICS) for e in est.values())
        for layer, e in est.items():
            assert abs(sum(e[m].mean for m in evaluation.MAGNITUDES) - totals[layer].mean) < 1e-9
            assert e["efficacy_mag"].lo <= e["efficacy_mag"].mean <= e["efficacy_mag"].hi
        # paired differences: zero against itself, and each mean difference is the difference of the means
        diffs = evaluation.sweep_differences(sweep, sweep["best_layer"])
        assert diffs[sweep["best_layer"]].mean == diffs[sweep["best_layer"]].lo == diffs[sweep["best_layer"]].hi == 0
        for layer, est in diffs.items():
            assert abs(est.mean - (totals[layer].mean - totals[sweep["best_layer"]].mean)) < 1e-9
            assert est.mean <= 1e-12 and est.lo <= est.mean <= est.hi
        # the layer rule: the best layer never gives way to a worse one; it replaces another only by a clear margin
        assert evaluation.layer_rule(sweep, sweep["best_layer"])[0] == sweep["best_layer"]
        for layer in sweep["layers"]:
            kept, d = evaluation.layer_rule(sweep, layer)
            assert kept in (layer, sweep["best_layer"]) and (kept != layer) == (d[sweep["best_layer"]].lo > 0)
    with pytest.raises(ValueError, match="was not swept"):
        evaluation.sweep_differences(sweeps[0], next(l for l in range(100) if l not in sweeps[0]["layers"]))
    with pytest.raises(ValueError, match="Unknown outcome"):
        evaluation.sweep_matrices(sweeps[0], "fluency")
    with pytest.raises(ValueError, match="Unknown scores"):
        evaluation.sweep_estimates(sweeps[0], ["fluency"])


def test_layer_rule_keeps_the_layer_in_use_unless_a_better_one_wins_fact_by_fact():
    # A check sweep on 40 facts: layer 0 in use, layer 2 better on average by `gain` per magnitude, per-fact noise.
    rng = np.random.default_rng(0)

    def record(gain: float, reference: int | None = 0) -> dict:
        base = rng.uniform(0.2, 0.8, size=(len(evaluation.MAGNITUDES), 40))
        noise = rng.normal(0, 0.1, size=base.shape)
        other = base + gain + noise - noise.mean(axis=1, keepdims=True)  # better by exactly `gain` on average
        sweep = {"layers": [0, 2], "settings": {"rule_reference": reference},
                 "per_layer": {"0": dict(zip(evaluation.MAGNITUDES, base.tolist())),
                               "2": dict(zip(evaluation.MAGNITUDES, other.tolist()))}}
        sweep["best_layer"] = 2 if other.sum() > base.sum() else 0
        return sweep

    narrow, clear = record(0.005), record(0.1)
    assert narrow["best_layer"] == 2 and clear["best_layer"] == 2, "layer 2 is better on average in both"
    kept, diffs = evaluation.layer_rule(narrow, 0)
    assert diffs[2].lo <= 0 < diffs[2].mean and kept == 0 == evaluation.chosen_layer(narrow), "a hair is not enough"
    kept, diffs = evaluation.layer_rule(clear, 0)
    assert diffs[2].lo > 0 and kept == 2 == evaluation.chosen_layer(clear)
    assert evaluation.chosen_layer(record(0.005, reference=None)) == 2, "without a rule: the sweep's best layer"
    # one score at a time: the same paired comparison per magnitude, whose means add up to the summed one's
    per_score = {m: evaluation.sweep_differences(clear, 0, metric=m)[2] for m in evaluation.MAGNITUDES}
    assert np.isclose(sum(e.mean for e in per_score.values()), diffs[2].mean)
    assert all(np.isclose(e.mean, 0.1) for e in per_score.values()), "each magnitude gained `gain` on average"
    with pytest.raises(ValueError, match="Unknown score"):
        evaluation.sweep_differences(clear, 0, metric="neighbours")


def test_rule_check_reads_each_committed_check_as_its_rule_decides():
    # Every committed sweep run under a rule: the layer it keeps is chosen_layer's, its numbers are those of the
    # functions it gathers, and the deeper layers are the swept ones above both the reference and the best layer.
    from importlib import resources

    folder = resources.files("engram_helpers").joinpath("hparams", "sweeps")
    sweeps = [json.loads(f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".json")]
    checks = [s for s in sweeps if s["settings"].get("rule_reference") is not None]
    assert len(checks) >= 2, "SmolLM2's fresh check and Gemma's (fresh, clamp 2)"
    for sweep in checks:
        rc = evaluation.rule_check(sweep)
        assert rc.kept == evaluation.chosen_layer(sweep) and rc.reference == sweep["settings"]["rule_reference"]
        assert rc.differences == evaluation.layer_rule(sweep, rc.reference)[1]
        assert rc.n_facts == len(sweep["fact_ids"]) and 1 <= rc.n_relations <= rc.n_facts
        assert rc.deeper == [l for l in sweep["layers"] if l > rc.reference and l > sweep["best_layer"]]
        for layer in rc.deeper:
            for m in evaluation.MAGNITUDES:
                assert rc.deeper_differences[layer][m] == evaluation.sweep_differences(sweep, rc.reference, m)[layer]
        text = rc.report()
        assert f"the rule {'keeps' if rc.kept == rc.reference else 'moves to'} layer {rc.kept}" in text
        assert all(f"layer {l}: sum" in text for l in sweep["layers"])
    unruled = next(s for s in sweeps if s["settings"].get("rule_reference") is None)
    with pytest.raises(ValueError, match="without a rule"):
        evaluation.rule_check(unruled)


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


def test_recorded_fact_ids_and_committed_results(tmp_path, monkeypatch):
    # --exclude's reader: the union of the records' fact ids; a file without them is an error that says what to pass
    (tmp_path / "a.json").write_text(json.dumps({"fact_ids": [1, 2]}), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"fact_ids": [2, 3], "per_layer": {}}), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"summary": []}), encoding="utf-8")
    assert evaluation.recorded_fact_ids([tmp_path / "a.json", tmp_path / "b.json"]) == {1, 2, 3}
    assert evaluation.recorded_fact_ids([]) == set()
    with pytest.raises(ValueError, match="no 'fact_ids'"):
        evaluation.recorded_fact_ids([tmp_path / "c.json"])
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

"""engram_helpers.sweeps: the committed layer sweeps read back, the layer rule, and Hase et al.'s analysis."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engram_helpers import evaluation, sweeps


def test_tracing_predicts_editing_finds_a_real_predictor_and_not_a_fake_one():
    rng = np.random.default_rng(0)
    n_facts, n_layers = 20, 6
    layer_effect = np.linspace(0.2, 0.8, n_layers)
    E = rng.uniform(0, 1, size=(n_facts, n_layers))
    noise = 0.05 * rng.normal(size=(n_facts, n_layers))
    real = sweeps.tracing_predicts_editing(layer_effect + 0.5 * E + noise, E, n_boot=200, n_perm=200)
    fake = sweeps.tracing_predicts_editing(layer_effect + noise, E, n_boot=200, n_perm=200)
    against = sweeps.tracing_predicts_editing(layer_effect - 0.5 * E + noise, E, n_boot=200, n_perm=200)
    assert real["gain"] > 0.3 and real["gain_ci"][0] > 0.1 and real["r2_both"] > 0.9
    assert real["gain_p"] == 1 / 201 and 0.4 < real["slope_ci"][0] < real["slope"] < real["slope_ci"][1] < 0.6
    assert against["gain_p"] == 1 / 201 and -0.6 < against["slope_ci"][0] < against["slope_ci"][1] < -0.4
    # a fake predictor: the in-sample gain is still positive (its interval cannot show chance), the
    # permutation test does, and the slope's interval contains zero
    assert 0 < fake["gain"] < 0.05 and fake["gain_ci"][0] >= -1e-12
    assert fake["gain_p"] > 0.05 and fake["slope_ci"][0] < 0 < fake["slope_ci"][1]
    assert fake["r2_layer"] > 0.9 and real["r2_layer"] < fake["r2_layer"]
    assert real == sweeps.tracing_predicts_editing(layer_effect + 0.5 * E + noise, E, n_boot=200, n_perm=200)
    with pytest.raises(ValueError, match="facts, layers"):
        sweeps.tracing_predicts_editing(np.zeros(5), np.zeros(5))


def test_sweep_matrices_reproduce_the_committed_hase_analysis():
    # The committed layer sweeps recorded Hase et al.'s analysis when they ran; read back from their per-layer
    # scores, the same fit gives the same numbers (the layers in the record's order, facts as rows).
    from importlib import resources

    folder = resources.files("engram_helpers").joinpath("hparams", "sweeps")
    records = [json.loads(f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".json")]
    assert len(records) >= 2, "both offline models have a committed sweep"
    for sweep in records:
        Y, E = sweeps.sweep_matrices(sweep, "paraphrase_mag")
        assert Y.shape == E.shape == (len(sweep["fact_ids"]), len(sweep["layers"]))
        np.testing.assert_array_equal(Y[:, 1], sweep["per_layer"][str(sweep["layers"][1])]["paraphrase_mag"])
        h, recorded = sweeps.tracing_predicts_editing(Y, E), sweep["hase_paraphrase_mag"]
        for key in ("r2_layer", "r2_both", "gain", "r"):
            assert abs(h[key] - recorded[key]) < 1e-9, (sweep["model"], key)
        # the recorded choice, read back: the same means per layer, the same best layer, which is among the close
        totals, close = sweeps.sweep_totals(sweep)
        assert sorted(totals) == sorted(sweep["layers"])
        for layer, est in totals.items():
            assert abs(est.mean - sweep["score"][str(layer)]) < 1e-9 and est.lo <= est.mean <= est.hi
        assert max(totals, key=lambda l: totals[l].mean) == sweep["best_layer"] and sweep["best_layer"] in close
        assert all(totals[l].mean >= totals[sweep["best_layer"]].lo for l in close)
        assert [f.id for f in sweeps.sweep_facts(sweep)] == sweep["fact_ids"]
        # per-score estimates: every layer and score, and the three magnitudes' means add up to the total's
        est = sweeps.sweep_estimates(sweep)
        assert sorted(est) == sorted(sweep["layers"])
        assert all(sorted(e) == sorted(evaluation.METRICS) for e in est.values())
        for layer, e in est.items():
            assert abs(sum(e[m].mean for m in evaluation.MAGNITUDES) - totals[layer].mean) < 1e-9
            assert e["efficacy_mag"].lo <= e["efficacy_mag"].mean <= e["efficacy_mag"].hi
        # paired differences: zero against itself, and each mean difference is the difference of the means
        diffs = sweeps.sweep_differences(sweep, sweep["best_layer"])
        assert diffs[sweep["best_layer"]].mean == diffs[sweep["best_layer"]].lo == diffs[sweep["best_layer"]].hi == 0
        for layer, est in diffs.items():
            assert abs(est.mean - (totals[layer].mean - totals[sweep["best_layer"]].mean)) < 1e-9
            assert est.mean <= 1e-12 and est.lo <= est.mean <= est.hi
        # the layer rule: the best layer never gives way to a worse one; it replaces another only by a clear margin
        assert sweeps.layer_rule(sweep, sweep["best_layer"])[0] == sweep["best_layer"]
        for layer in sweep["layers"]:
            kept, d = sweeps.layer_rule(sweep, layer)
            assert kept in (layer, sweep["best_layer"]) and (kept != layer) == (d[sweep["best_layer"]].lo > 0)
    with pytest.raises(ValueError, match="was not swept"):
        sweeps.sweep_differences(records[0], next(l for l in range(100) if l not in records[0]["layers"]))
    with pytest.raises(ValueError, match="Unknown outcome"):
        sweeps.sweep_matrices(records[0], "fluency")
    with pytest.raises(ValueError, match="Unknown scores"):
        sweeps.sweep_estimates(records[0], ["fluency"])


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
    kept, diffs = sweeps.layer_rule(narrow, 0)
    assert diffs[2].lo <= 0 < diffs[2].mean and kept == 0 == sweeps.chosen_layer(narrow), "a hair is not enough"
    kept, diffs = sweeps.layer_rule(clear, 0)
    assert diffs[2].lo > 0 and kept == 2 == sweeps.chosen_layer(clear)
    assert sweeps.chosen_layer(record(0.005, reference=None)) == 2, "without a rule: the sweep's best layer"
    # one score at a time: the same paired comparison per magnitude, whose means add up to the summed one's
    per_score = {m: sweeps.sweep_differences(clear, 0, metric=m)[2] for m in evaluation.MAGNITUDES}
    assert np.isclose(sum(e.mean for e in per_score.values()), diffs[2].mean)
    assert all(np.isclose(e.mean, 0.1) for e in per_score.values()), "each magnitude gained `gain` on average"
    with pytest.raises(ValueError, match="Unknown score"):
        sweeps.sweep_differences(clear, 0, metric="neighbours")


def test_rule_check_reads_each_committed_check_as_its_rule_decides():
    # Every committed sweep run under a rule: the layer it keeps is chosen_layer's, its numbers are those of the
    # functions it gathers, and the deeper layers are the swept ones above both the reference and the best layer.
    from importlib import resources

    folder = resources.files("engram_helpers").joinpath("hparams", "sweeps")
    records = [json.loads(f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".json")]
    checks = [s for s in records if s["settings"].get("rule_reference") is not None]
    assert len(checks) >= 2, "SmolLM2's fresh check and Gemma's (fresh, clamp 2)"
    for sweep in checks:
        rc = sweeps.rule_check(sweep)
        assert rc.kept == sweeps.chosen_layer(sweep) and rc.reference == sweep["settings"]["rule_reference"]
        assert rc.differences == sweeps.layer_rule(sweep, rc.reference)[1]
        assert (rc.totals, rc.close) == sweeps.sweep_totals(sweep) and rc.best in rc.close
        assert rc.n_facts == len(sweep["fact_ids"]) and 1 <= rc.n_relations <= rc.n_facts
        assert rc.deeper == [l for l in sweep["layers"] if l > rc.reference and l > sweep["best_layer"]]
        for layer in rc.deeper:
            for m in evaluation.MAGNITUDES:
                assert rc.deeper_differences[layer][m] == sweeps.sweep_differences(sweep, rc.reference, m)[layer]
        text = rc.report()
        assert f"the rule {'keeps' if rc.kept == rc.reference else 'moves to'} layer {rc.kept}" in text
        assert all(f"layer {l}: sum" in text for l in sweep["layers"])
    unruled = next(s for s in records if s["settings"].get("rule_reference") is None)
    with pytest.raises(ValueError, match="without a rule"):
        sweeps.rule_check(unruled)


def test_recorded_fact_ids_reads_the_records_a_check_leaves_out(tmp_path):
    # --exclude's reader: the union of the records' fact ids; a file without them is an error that says what to pass
    (tmp_path / "a.json").write_text(json.dumps({"fact_ids": [1, 2]}), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"fact_ids": [2, 3], "per_layer": {}}), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"summary": []}), encoding="utf-8")
    assert sweeps.recorded_fact_ids([tmp_path / "a.json", tmp_path / "b.json"]) == {1, 2, 3}
    assert sweeps.recorded_fact_ids([]) == set()
    with pytest.raises(ValueError, match="no 'fact_ids'"):
        sweeps.recorded_fact_ids([tmp_path / "c.json"])

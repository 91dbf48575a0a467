"""The facts dataset: schema rules, and that the default model knows enough of it."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from by_path import load

from engram_helpers.data import Fact, facts_in_split, is_known, known_facts, load_facts, relations
from engram_helpers.models import load_model

ROOT = Path(__file__).resolve().parents[1]
split_facts = load("scripts/split_facts.py")


@pytest.fixture(scope="module")
def facts() -> list[Fact]:
    return load_facts()


def test_size_and_relations(facts):
    assert len(facts) >= 60
    assert len(relations(facts)) >= 6


def test_ids_unique_and_ordered(facts):
    assert [f.id for f in facts] == list(range(len(facts)))


def test_template_has_one_slot_and_prompt_contains_subject(facts):
    for f in facts:
        assert f.template.count("{}") == 1, f
        assert f.subject in f.prompt
        assert not f.prompt.endswith(" "), f"prompt of fact {f.id} ends with a space: the answer brings its own"


def test_paraphrases_contain_subject(facts):
    for f in facts:
        assert len(f.paraphrases) == 2, f.id
        for p in f.paraphrases:
            assert f.subject in p, (f.id, p)
            assert p != f.prompt


def test_neighbourhood_prompts_are_other_subjects(facts):
    for f in facts:
        assert 2 <= len(f.neighbourhood) <= 3, f.id
        for p in f.neighbourhood:
            assert f.subject not in p, (f.id, p)


def test_counterfactual_differs_and_answers_are_not_given_away(facts):
    for f in facts:
        assert f.target_new != f.target_true, f.id
        for p in (f.prompt, *f.paraphrases, *f.neighbourhood):
            assert not re.search(rf"\b{re.escape(f.target_true)}\b", p), (f.id, p)


def test_neighbours_share_the_true_object(facts):
    """A neighbourhood prompt that is itself a record's prompt must have the same true object."""
    by_prompt = {f.prompt: f for f in facts}
    shared = 0
    for f in facts:
        for p in f.neighbourhood:
            if p in by_prompt:
                shared += 1
                assert by_prompt[p].target_true == f.target_true, (f.id, p)
    assert shared > 50  # the check above really ran


def test_known_facts_on_default_model(facts):
    model, tok = load_model()
    known = known_facts(model, tok, facts)
    assert len(known) >= 30
    flags = is_known(model, tok, facts)
    assert sum(flags) == len(known)
    assert all(k in facts for k in known)
    assert is_known(model, tok, []) == []


def test_dev_and_test_splits_are_disjoint_cover_everything_and_are_stratified(facts):
    dev, test = facts_in_split("dev", facts), facts_in_split("test", facts)
    dev_ids, test_ids = {f.id for f in dev}, {f.id for f in test}
    assert not dev_ids & test_ids, f"facts in both splits: {sorted(dev_ids & test_ids)}"
    assert dev_ids | test_ids == {f.id for f in facts}, "some facts are in no split: run scripts/split_facts.py"
    assert not {f.prompt for f in dev} & {f.prompt for f in test}, "the same prompt is in both splits"
    for rel in relations(facts):
        n = sum(f.relation == rel for f in facts)
        n_dev = sum(f.relation == rel for f in dev)
        assert n_dev == split_facts.dev_quota(n), (rel, n_dev, n)
        assert 0 < n_dev < n, f"relation {rel} must have facts in both splits"
    assert facts_in_split("dev") == dev  # the default is the whole dataset


def test_split_file_is_what_the_script_writes():
    """The committed facts.json is a fixed point of scripts/split_facts.py: every record has a split, in the
    script's layout (a split edited by hand is caught by the reproducibility test below)."""
    text = split_facts.FACTS_PATH.read_text(encoding="utf-8")
    records = json.loads(text)
    assert split_facts.dumps(split_facts.assign_splits(records)) == text


def test_split_script_keeps_assignments_and_places_new_records_deterministically():
    records = json.loads(split_facts.FACTS_PATH.read_text(encoding="utf-8"))
    fresh = split_facts.assign_splits([{k: v for k, v in r.items() if k != "split"} for r in records])
    assert [r["split"] for r in fresh] == [r["split"] for r in records], "the split is not reproducible from its seed"
    new = [{**records[i], "id": len(records) + j, "subject": f"New subject {j}"} for j, i in enumerate(range(0, 40, 2))]
    for r in new:
        del r["split"]
    once = split_facts.assign_splits(records + new)
    twice = split_facts.assign_splits(records + new)
    assert once == twice
    assert [r["split"] for r in once[: len(records)]] == [r["split"] for r in records], "old records changed split"
    for rel in {r["relation"] for r in once}:
        group = [r for r in once if r["relation"] == rel]
        assert sum(r["split"] == "dev" for r in group) == split_facts.dev_quota(len(group)), rel
    with pytest.raises(ValueError, match="split"):
        split_facts.assign_splits([{**records[0], "split": "train"}])


def test_facts_in_split_rejects_bad_input(facts):
    with pytest.raises(ValueError, match="dev"):
        facts_in_split("train", facts)
    with pytest.raises(ValueError, match="split_facts.py"):
        facts_in_split("dev", [replace(facts[0], split="")])

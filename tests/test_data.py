"""The facts dataset: schema rules, and that the default model knows enough of it."""

import re

import pytest

from engram_helpers.data import Fact, is_known, known_facts, load_facts, relations
from engram_helpers.models import load_model


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

"""The Query type: the subject's span comes from the template's {}, also after a context prefix."""

import pytest

from engram_helpers.data import load_facts
from engram_helpers.models import encode
from engram_helpers.query import Query, contexts, subject_last, subject_span


def _subject_text(tok, q: Query) -> str:
    batch, _ = encode(tok, q.prompt)
    start, end = subject_span(tok, q)
    return tok.decode(batch["input_ids"][0, start:end]).strip()


def test_span_covers_exactly_the_subject(default_model):
    _, tok = default_model
    for fact in load_facts()[::7]:
        assert _subject_text(tok, fact.query()) == fact.subject


def test_prefix_containing_the_subject_does_not_move_the_span(default_model):
    _, tok = default_model
    q = Query("The capital of {} is", "France", "Paris")
    ctx = q.in_context("I flew to France last week")
    assert ctx.prompt == "I flew to France last week. The capital of France is"
    start, end = subject_span(tok, ctx)
    # the occurrence inside the prefix comes first in the text; the span must be the one in the template
    assert start > subject_span(tok, Query("I flew to {} last week. The capital of France is", "France"))[0]
    assert _subject_text(tok, ctx) == "France"
    assert subject_last(tok, ctx) == end - 1
    # and the key position is the last subject token of the second occurrence
    assert tok.decode(encode(tok, ctx.prompt)[0]["input_ids"][0, end:]).strip() == "is"


def test_template_words_containing_the_subject(default_model):
    _, tok = default_model
    q = Query("Paris is not {} but", "Paris")
    start, _ = subject_span(tok, q)
    assert start > 1  # the "Paris" of the fixed words is at position 1 (after the prefix token)


def test_contexts_and_targets():
    q = Query("The {} is in", "Louvre", "Paris")
    cs = contexts(q, ["A {b}rief text", "Another"])
    assert [c.prompt for c in cs] == ["The Louvre is in", "A b rief text. The Louvre is in",
                                      "Another. The Louvre is in"]
    assert all(c.subject == "Louvre" and c.target == "Paris" for c in cs)
    assert q.with_target("Rome").target == "Rome" and q.target == "Paris"
    fact = load_facts()[0]
    assert fact.query().target == fact.target_true and fact.query(fact.target_new).target == fact.target_new
    assert fact.query().prompt == fact.prompt


@pytest.mark.parametrize("template, subject, target", [
    ("The capital of France is", "France", None),      # no slot
    ("{} and {}", "France", None),                     # two slots
    ("The capital of {} is", "", None),                # empty subject
    ("The capital of {} is", " France", None),         # spaces belong to the template
    ("The capital of {} is", "France", "  "),          # empty target
    ("The {x} of {} is", "France", None),              # stray braces
])
def test_bad_queries_fail_clearly(template, subject, target):
    with pytest.raises(ValueError):
        Query(template, subject, target)


def test_require_target():
    with pytest.raises(ValueError, match="no target"):
        Query("The capital of {} is", "France").require_target()

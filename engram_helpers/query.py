"""A query: the unit every method takes (tracing, ROME, MEMIT, forgetting, the explorers).

A query is a template with one ``{}`` where the subject goes, the subject, and optionally the answer it
is about (``target``)::

    q = Query("The {} is located in the city of", "Eiffel Tower", "Paris")
    q.prompt                     # "The Eiffel Tower is located in the city of"
    subject_span(tok, q)         # (start, end) token positions of "Eiffel Tower" in encode(tok, q.prompt)
    q.in_context("I love Paris") # the same query after a context prefix: "I love Paris. The {} is ..."

The subject's tokens are found from the position of ``{}`` in the template, never by searching the
filled text (as ROME's ``repr_tools.get_words_idxs_in_templates`` does). So a context prefix that happens
to contain the subject, or a template whose fixed words contain it, cannot move the span.

``target`` is the answer whose probability a method measures or edits toward: the true object for
tracing, the new object for an edit. :meth:`engram_helpers.data.Fact.query` builds either.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .models import bos_prefix

SLOT = "{}"


@dataclass(frozen=True)
class Query:
    """``template`` with exactly one ``{}``, the ``subject`` that fills it, and an optional ``target`` answer."""

    template: str
    subject: str
    target: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or self.template.count(SLOT) != 1:
            raise ValueError(
                f"A query template needs exactly one '{{}}' where the subject goes, e.g. "
                f"'The capital of {{}} is'; got {self.template!r}."
            )
        if "{" in self.template.replace(SLOT, "") or "}" in self.template.replace(SLOT, ""):
            raise ValueError(f"The template {self.template!r} has a brace other than its one '{{}}': remove it.")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("The subject is empty: give the words that fill the template's '{}', e.g. 'France'.")
        if self.subject != self.subject.strip():
            raise ValueError(f"The subject {self.subject!r} has leading or trailing spaces: "
                             "put spaces in the template.")
        if self.target is not None and not self.target.strip():
            raise ValueError(f"The target {self.target!r} is empty: give an answer such as 'Paris', or None.")

    @property
    def prompt(self) -> str:
        """The template filled with the subject."""
        return self.template.replace(SLOT, self.subject)

    @property
    def subject_chars(self) -> tuple[int, int]:
        """Character positions ``[start, end)`` of the subject in :attr:`prompt`."""
        start = self.template.index(SLOT)
        return start, start + len(self.subject)

    def in_context(self, prefix: str) -> "Query":
        """The query after a context prefix: template ``prefix + ". " + template`` (ROME's context rule).

        An empty prefix returns the query unchanged. Braces in the prefix are removed.
        """
        if not prefix:
            return self
        clean = " ".join(prefix.replace("{", " ").replace("}", " ").split())
        return replace(self, template=f"{clean}. {self.template}")

    def with_target(self, target: str | None) -> "Query":
        """The same template and subject with another answer."""
        return replace(self, target=target)

    def require_target(self) -> str:
        """The target, or a clear error for methods that need one (e.g. an edit)."""
        if self.target is None:
            raise ValueError(
                f"The query {self.prompt!r} has no target: give the answer, e.g. Query(template, subject, 'Rome') "
                f"or fact.query(fact.target_new)."
            )
        return self.target


def contexts(query: Query, prefixes: list[str] | tuple[str, ...]) -> list[Query]:
    """The query alone, then the query after each context prefix: ``[query, *query.in_context(p)]``."""
    return [query] + [query.in_context(p) for p in prefixes]


def subject_span(tok, query: Query) -> tuple[int, int]:
    """Token positions ``[start, end)`` of the subject in ``models.encode(tok, query.prompt)``.

    Found from the template's ``{}`` and the tokenizer's character offsets, so a tokenizer that merges the
    leading space into the subject's first token (``" France"``) gives the same span as one that does not.
    Positions count the prefix token that :func:`engram_helpers.models.encode` prepends.
    """
    prefix = bos_prefix(tok)
    char_start, char_end = (c + len(prefix) for c in query.subject_chars)
    enc = tok(prefix + query.prompt, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < char_end and b > char_start and b > a]
    if not inside:
        raise ValueError(f"The subject {query.subject!r} covers no token of the prompt {query.prompt!r}.")
    return inside[0], inside[-1] + 1


def subject_last(tok, query: Query) -> int:
    """Position of the subject's last token in ``models.encode(tok, query.prompt)``."""
    return subject_span(tok, query)[1] - 1

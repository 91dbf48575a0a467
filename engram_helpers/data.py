"""The facts dataset, in the style of CounterFact (Meng et al. 2022), kept in the repository.

Each record has a subject, a relation prompt template, the true object, a counterfactual object, two
paraphrase prompts and neighbourhood prompts (other subjects, same relation, same true object). It is the
shared data for causal tracing, ROME and forgetting. Which facts a model knows is computed, never typed:
see :func:`known_facts` and :func:`is_known`.

Seven relations: ``landmark_city``, ``capital_of``, ``official_language``, ``continent``, ``city_country``,
``athlete_sport``, ``product_maker``. A country is the only subject with its capital, so the neighbourhood
prompts of ``capital_of`` records are landmarks of that capital (``"The Colosseum is located in the city
of"`` for Italy): other subjects with the same object, in the nearest relation. No prompt contains its
true object as a word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch

from .models import first_token_id, next_token_probs
from .query import Query


@dataclass(frozen=True)
class Fact:
    """One factual association ``(subject, relation, object)`` with its counterfactual and test prompts."""

    id: int
    relation: str            # e.g. "capital_of"
    template: str            # with "{}" where the subject goes, e.g. "The capital of {} is"
    subject: str
    target_true: str         # the true object, e.g. "Paris"
    target_new: str          # a counterfactual object for editing, e.g. "Rome"
    paraphrases: tuple[str, ...]    # full prompts, same fact, other wording (contain the subject)
    neighbourhood: tuple[str, ...]  # full prompts, other subjects, same relation and same true object
    split: str = ""          # "dev" (choose settings) or "test" (report results); see scripts/split_facts.py

    @property
    def prompt(self) -> str:
        """The template filled with the subject, e.g. "The capital of France is"."""
        return self.template.format(self.subject)

    def query(self, target: str | None = None) -> Query:
        """This fact as a :class:`~engram_helpers.query.Query`; ``target`` defaults to the true object.

        ``fact.query()`` is what tracing and recall measure; ``fact.query(fact.target_new)`` is an edit request.
        """
        return Query(self.template, self.subject, self.target_true if target is None else target)


def load_facts() -> list[Fact]:
    """All records of ``facts.json`` as :class:`Fact` objects, in file order."""
    text = resources.files("engram_helpers").joinpath("facts.json").read_text(encoding="utf-8")
    records = json.loads(text)
    return [
        Fact(**{**r, "paraphrases": tuple(r["paraphrases"]), "neighbourhood": tuple(r["neighbourhood"])})
        for r in records
    ]


def facts_in_split(name: str, facts: list[Fact] | None = None) -> list[Fact]:
    """The facts of split ``name`` ("dev" or "test"), in order; ``facts`` defaults to the whole dataset."""
    if name not in ("dev", "test"):
        raise ValueError(f"unknown split {name!r}: use 'dev' (to choose settings) or 'test' (to report results)")
    facts = load_facts() if facts is None else facts
    missing = [f.id for f in facts if f.split not in ("dev", "test")]
    if missing:
        raise ValueError(f"facts {missing} have no split: run `python scripts/split_facts.py` after adding records")
    return [f for f in facts if f.split == name]


def relations(facts: list[Fact] | None = None) -> list[str]:
    """The distinct relations of ``facts`` (default: the whole dataset), in order of first appearance."""
    facts = load_facts() if facts is None else facts
    return list(dict.fromkeys(f.relation for f in facts))


@torch.no_grad()
def is_known(model, tok, facts: list[Fact] | None = None) -> list[bool]:
    """For each fact: is the first token of ``" " + target_true`` the model's top-1 next token after the prompt?"""
    facts = load_facts() if facts is None else facts
    if not facts:
        return []
    probs = next_token_probs(model, tok, [f.prompt for f in facts])
    top = probs.argmax(dim=-1)
    return [int(t) == first_token_id(tok, f.target_true) for f, t in zip(facts, top)]


def known_facts(model, tok, facts: list[Fact] | None = None) -> list[Fact]:
    """The facts whose true object's first token is the model's top-1 prediction after the prompt."""
    facts = load_facts() if facts is None else facts
    return [f for f, known in zip(facts, is_known(model, tok, facts)) if known]


def spread_over_relations(facts: list[Fact], n: int, seed: int = 0) -> list[Fact]:
    """``n`` of ``facts`` spread over their relations: a seeded shuffle within each relation, then one fact
    from each relation in turn (round-robin) until ``n`` are taken or none are left."""
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n}).")
    gen = torch.Generator().manual_seed(seed)
    groups = [[f for f in facts if f.relation == r] for r in relations(facts)]
    groups = [[g[i] for i in torch.randperm(len(g), generator=gen).tolist()] for g in groups]
    chosen: list[Fact] = []
    for i in range(max((len(g) for g in groups), default=0)):
        chosen += [g[i] for g in groups if i < len(g)]
    return chosen[:n]

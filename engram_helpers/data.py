"""The facts dataset, in the style of CounterFact (Meng et al. 2022), kept in the repository.

Each record has a subject, a relation prompt template, the true object, a counterfactual object, two
paraphrase prompts and neighbourhood prompts (other subjects, same relation, same true object). It is the
shared data for causal tracing, ROME and forgetting. Which facts a model knows is computed, never typed:
see :func:`known_facts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch

from .models import first_token_id, next_token_probs


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

    @property
    def prompt(self) -> str:
        """The template filled with the subject, e.g. "The capital of France is"."""
        return self.template.format(self.subject)


def load_facts() -> list[Fact]:
    """All records of ``facts.json`` as :class:`Fact` objects, in file order."""
    text = resources.files("engram_helpers").joinpath("facts.json").read_text(encoding="utf-8")
    records = json.loads(text)
    return [
        Fact(**{**r, "paraphrases": tuple(r["paraphrases"]), "neighbourhood": tuple(r["neighbourhood"])})
        for r in records
    ]


@torch.no_grad()
def known_facts(model, tokenizer, facts: list[Fact] | None = None) -> list[Fact]:
    """The facts whose true object's first token is the model's top-1 prediction after the prompt."""
    facts = load_facts() if facts is None else facts
    probs = next_token_probs(model, tokenizer, [f.prompt for f in facts])
    top = probs.argmax(dim=-1)
    return [f for f, t in zip(facts, top) if int(t) == first_token_id(tokenizer, f.target_true)]

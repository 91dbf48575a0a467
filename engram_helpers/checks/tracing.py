"""Checks for the causal-tracing notebook's exercises (``notebooks/causal_tracing.ipynb``).

Each check calls the reader's function on small random inputs and compares it with the library's
reference in :mod:`engram_helpers.tracing`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import tracing
from . import CheckFailed, assert_close, passed


def _inputs(seed: int, batch: int = 3, seq: int = 7, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, d, generator=gen), torch.randn(seq, d, generator=gen)


def check_corrupt(corrupt: Callable) -> None:
    """``corrupt(embeds [batch, seq, d], span (start, end), noise [batch, end - start, d]) -> [batch, seq, d]``."""
    for seed, span in [(0, (2, 5)), (1, (1, 2)), (2, (3, 7))]:
        embeds, _ = _inputs(seed)
        gen = torch.Generator().manual_seed(100 + seed)
        noise = torch.randn(embeds.shape[0], span[1] - span[0], embeds.shape[2], generator=gen)
        before = embeds.clone()
        got = corrupt(embeds, span, noise)
        if not torch.equal(embeds, before):
            raise CheckFailed("corrupt changed its input in place: work on a copy (embeds.clone()), so that the "
                              "clean embeddings stay available.")
        expected = tracing.corrupt_embeddings(embeds, span, noise)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            start, end = span
            outside = torch.ones(embeds.shape[1], dtype=torch.bool)
            outside[start:end] = False
            if not torch.allclose(got[:, outside], embeds[:, outside]):
                raise CheckFailed(f"For span {span}, tokens outside positions {start}..{end - 1} changed. Only the "
                                  f"subject's tokens get noise; the span's end is exclusive, as in Python slices.")
            if torch.allclose(got, embeds):
                raise CheckFailed("The output equals the input: the noise was not added to the subject's tokens.")
            if torch.allclose(got[:, start:end], noise):
                raise CheckFailed("The subject's embeddings were replaced by the noise; add the noise to them.")
        assert_close(got, expected, f"corrupt(embeds, span={span}, noise)",
                     hint="Row i of noise goes to row i of embeds, token k of noise to position start + k.")
    passed("corrupt")


def check_restore(restore: Callable) -> None:
    """``restore(corrupted [batch, seq, d], clean [seq, d], position) -> [batch, seq, d]``: every row gets the
    clean state at ``position``."""
    for seed, position in [(0, 3), (1, 0), (2, 6)]:
        corrupted, clean = _inputs(seed)
        before = corrupted.clone()
        got = restore(corrupted, clean, position)
        if not torch.equal(corrupted, before):
            raise CheckFailed("restore changed the corrupted tensor in place: return a modified copy "
                              "(corrupted.clone()). A forward hook that edits in place can corrupt other readers.")
        rows = torch.arange(corrupted.shape[0])
        expected = tracing.restore_state(corrupted, clean, rows, torch.full_like(rows, position))
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            if torch.allclose(got, clean.expand_as(got)):
                raise CheckFailed("Every position was restored. Restore only the one position, in every row.")
            if not torch.allclose(got[:, position], clean[position].expand(corrupted.shape[0], -1)):
                raise CheckFailed(f"At position {position} the output is not the clean state in every row. Copy "
                                  f"clean[position] into [:, position] (all rows of the batch).")
        assert_close(got, expected, f"restore(corrupted, clean, position={position})",
                     hint="Positions other than `position` must keep their corrupted values.")
    passed("restore")


def check_token_categories(categories: Callable) -> None:
    """``categories(span, n_tokens) -> {category: [positions]}`` with the keys of ``tracing.CATEGORIES``."""
    cases = [((2, 5), 9), ((1, 2), 4), ((4, 5), 6), ((1, 4), 4), ((3, 5), 8)]
    for span, n_tokens in cases:
        got = categories(span, n_tokens)
        expected = tracing.token_categories(span, n_tokens)
        if not isinstance(got, dict) or set(got) != set(expected):
            raise CheckFailed(f"Return a dict with exactly the keys {list(tracing.CATEGORIES)}; got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        for name in tracing.CATEGORIES:
            if [int(i) for i in got[name]] != expected[name]:
                raise CheckFailed(
                    f"For a subject at span {span} in {n_tokens} tokens, {name!r} should be {expected[name]}, got "
                    f"{list(got[name])}. The span's end is exclusive; the last token is n_tokens - 1; a "
                    f"category can be empty, and the first token after the subject can also be the last token."
                )
    passed("token categories")


def check_replacement_traces(model, tok, traces, facts: list, kind: str = "mlp", window: int = 10) -> None:
    """``replacement_traces(...) -> tracing.FactTraces``: for facts of ``facts``, ``kind`` traces whose corruption
    replaced the subject by another subject of the same relation, with as many tokens and another answer.

    Verifies what can be verified: the settings (kind, window, one run per fact, replacement rather than
    noise), the shapes, that each replacement is a real subject of the same relation with another true
    object, and, by running the swapped prompt, that the corrupted run really was that prompt.
    """
    from ..data import load_facts
    from ..models import arch, first_token_id, next_token_probs

    if not isinstance(traces, tracing.FactTraces):
        raise CheckFailed(f"Return a tracing.FactTraces (e.g. tracing.FactTraces(queries, {{{kind!r}: results}})), "
                          f"got {type(traces).__name__}.")
    if kind not in traces.results or not traces.results[kind]:
        raise CheckFailed(f"No {kind!r} traces: trace kind={kind!r} (traced kinds: {list(traces.results)}).")
    results = traces.results[kind]
    if len(results) != len(traces.queries):
        raise CheckFailed(f"{len(traces.queries)} queries but {len(results)} {kind!r} traces: one trace per query.")
    by_query = {f.query(): f for f in facts}
    dataset = load_facts()
    for query, r in zip(traces.queries, results):
        fact = by_query.get(query)
        if fact is None:
            raise CheckFailed(f"{query.prompt!r} is not one of the facts you were given: trace fact.query().")
        if not r.replaced_by:
            raise CheckFailed(f"{fact.subject!r} was traced with Gaussian noise: pass replace_with=<other subject>.")
        other = next((g for g in dataset if g.subject == r.replaced_by and g.relation == fact.relation), None)
        if other is None or other.subject == fact.subject:
            raise CheckFailed(f"{r.replaced_by!r} is not another subject of the relation {fact.relation!r} in the "
                              f"dataset: take the replacement from the facts of the same relation.")
        if other.target_true == fact.target_true:
            raise CheckFailed(f"{r.replaced_by!r} has the same answer as {fact.subject!r} ({fact.target_true!r}): "
                              f"the corrupted run would still give the answer. Choose a subject with another answer.")
        if r.n_samples != 1 or r.window != window or r.kind != kind:
            raise CheckFailed(f"Trace kind={kind!r}, window={window}, n_samples=1 (got kind={r.kind!r}, "
                              f"window={r.window}, n_samples={r.n_samples}).")
        n_layers = len(arch(model).names(kind))
        if r.scores.shape != (len(r.tokens), n_layers):
            raise CheckFailed(f"scores of shape {r.scores.shape}, expected (tokens, layers) = "
                              f"{(len(r.tokens), n_layers)}.")
        swapped = fact.template.format(r.replaced_by)
        p_swapped = float(next_token_probs(model, tok, swapped)[0, first_token_id(tok, fact.target_true)])
        if abs(p_swapped - r.corrupted_prob) > 1e-7 + 1e-3 * p_swapped:  # float32 rounding, also for tiny p
            raise CheckFailed(f"The corrupted run of {fact.subject!r} gives p({fact.target_true}) = "
                              f"{r.corrupted_prob:.4f}, but the prompt {swapped!r} gives {p_swapped:.4f}: the "
                              f"subject's tokens were not replaced by those of {r.replaced_by!r}.")
    passed("replacement traces")


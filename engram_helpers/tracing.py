"""Causal tracing (Meng et al. 2022): where in a model does a fact come back?

Three runs of one :class:`~engram_helpers.query.Query`:

1. **clean**: the prompt as it is; the model gives the answer with probability ``p_clean``;
2. **corrupted**: Gaussian noise is added to the subject's token embeddings, so the model can no longer
   tell which subject the prompt is about; the answer's probability drops to ``p_corrupt``;
3. **corrupted with restoration**: the same corrupted run, but one internal state (a ``(token, layer)``
   of the residual stream, or MLP / attention outputs over a window of layers) is overwritten with its
   value from the clean run. If the answer's probability comes back, that state carries the fact.

The *indirect effect* of a state is ``p_restored - p_corrupt``; the *total effect* of the corruption is
``p_clean - p_corrupt``. All patching goes through :mod:`engram_helpers.hooks`; module names come from
:func:`engram_helpers.models.arch`.

:func:`trace_fact` computes only what a restoration can change. A restoration at token ``t`` changes
nothing at the positions before ``t`` (attention only looks back), so their keys and values are taken
from the corrupted run (a key/value cache), and only the positions from ``t`` on are computed; and
nothing changes below the restoration's first layer, so the rows of all restorations at one token run
together as one corrupted run up to there and are split off layer by layer (the batch grows inside the
forward pass). Logits are computed at the last position only. :func:`trace_fact_plain` is the paper's
plain loop (one forward pass over the whole prompt per location, clean row included), kept as the
reference for tests and the benchmark.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Sequence, cast

import numpy as np
import torch
from torch import nn

from .hooks import get_module, trace, trace_many
from .models import arch, cache_kwargs, encode, first_token_id, logits_at, output_logits
from .query import Query, subject_span
from .stats import bootstrap_mean

KINDS = ("layer", "mlp", "attn")
"""What is restored: the residual stream after a layer, the MLP outputs, the attention outputs."""

CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
"""The paper's token categories for averaging effects over prompts of different lengths."""


# ----------------------------------------------------------------------------------------------------------
# How much noise, what is restored, where.


def layer_window(center: int, n_layers: int, window: int) -> list[int]:
    """Layers restored together around ``center``: ``window`` consecutive layers, clipped at both ends.

    As in the authors' code (the paper's text says l* − 4 … l* + 5): from ``center - window // 2`` up to,
    not including, ``center + ceil(window / 2)``.
    ``window=1`` is the single layer ``center``.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (got {window}); 1 restores a single layer.")
    if not 0 <= center < n_layers:
        raise IndexError(f"Layer {center} does not exist: the model has layers 0..{n_layers - 1}")
    return list(range(max(0, center - window // 2), min(n_layers, center + math.ceil(window / 2))))


@torch.no_grad()
def embedding_std(model: nn.Module, tok, subjects: list[str] | None = None) -> float:
    """Standard deviation of what the embedding module outputs for the subjects' tokens (all tokens, all
    dimensions).

    Measured on the module's output, not its weight table, so a model that scales its embeddings inside
    the module (Gemma multiplies by sqrt(d_model)) gets noise on the scale of what its layers read.
    ``subjects`` defaults to the subjects of the facts dataset; each is tokenized as it follows a space.
    """
    if subjects is None:
        from .data import load_facts

        subjects = list(dict.fromkeys(f.subject for f in load_facts()))
    if not subjects:
        raise ValueError("embedding_std needs at least one subject.")
    ids = [i for s in subjects for i in tok(" " + s, add_special_tokens=False)["input_ids"]]
    embed = get_module(model, arch(model).embed)
    device = next(model.parameters()).device
    return float(embed(torch.tensor([ids], device=device)).float().std())


def noise_level(model: nn.Module, tok, factor: float = 3.0, subjects: list[str] | None = None) -> float:
    """The noise's standard deviation: ``factor`` × :func:`embedding_std` (the paper uses 3)."""
    return factor * embedding_std(model, tok, subjects)


def make_noise(n_samples: int, span: tuple[int, int], d_model: int, std: float, seed: int = 0) -> torch.Tensor:
    """Gaussian noise for the subject tokens: [n_samples, span length, d_model], seeded."""
    gen = torch.Generator().manual_seed(seed)
    return std * torch.randn(n_samples, span[1] - span[0], d_model, generator=gen)


def corrupt_embeddings(embeds: torch.Tensor, span: tuple[int, int], noise: torch.Tensor) -> torch.Tensor:
    """Add ``noise`` to the subject's embeddings; a new tensor.

    embeds: [batch, seq, d]; span: ``(start, end)`` positions; noise: [batch, end - start, d] (or
    [end - start, d], the same for every row). Tokens outside the span are unchanged.
    """
    start, end = span
    if noise.shape[-2] != end - start:
        raise ValueError(f"noise covers {noise.shape[-2]} tokens but the span {span} has {end - start}.")
    out = embeds.clone()
    out[:, start:end] = out[:, start:end] + noise.to(out.dtype).to(out.device)
    return out


@torch.no_grad()
def subject_replacement(model: nn.Module, tok, query: Query, other: str) -> torch.Tensor:
    """Symmetric token replacement (Zhang & Nanda 2024): what turns the subject's embeddings into those of
    ``other``, a different subject with as many tokens in this template. [1, span length, d]

    Added to the subject's embeddings like noise, it gives exactly the embeddings of the prompt with
    ``other`` in the subject's place, so the corrupted run is a real prompt about another subject.
    """
    if other.strip() == query.subject:
        raise ValueError(f"Replace the subject {query.subject!r} with a different subject of the same relation.")
    swapped = Query(query.template, other.strip(), query.target)
    span, span_other = subject_span(tok, query), subject_span(tok, swapped)
    device = next(model.parameters()).device
    ids = encode(tok, query.prompt, device)[0]["input_ids"]
    ids_other = encode(tok, swapped.prompt, device)[0]["input_ids"]
    outside = torch.ones(ids.shape[1], dtype=torch.bool)
    outside[span[0]:span[1]] = False
    if span != span_other or ids.shape != ids_other.shape or not torch.equal(ids[0, outside], ids_other[0, outside]):
        raise ValueError(f"{other!r} is tokens {span_other} of its prompt where {query.subject!r} is tokens {span}: "
                         f"symmetric token replacement needs a subject with the same number of tokens (and the "
                         f"rest of the prompt unchanged). Choose another subject.")
    embed = get_module(model, arch(model).embed)
    return (embed(ids_other) - embed(ids))[:, span[0]:span[1]].float()


def replacement_subject(tok, fact, candidates: list) -> str | None:
    """A subject to put in ``fact``'s place for symmetric token replacement, or ``None`` if there is none.

    The first of ``candidates`` (facts) with the same relation, another true object whose first token differs
    (so that the replaced prompt does not still call for the scored answer token) and as many tokens in
    ``fact``'s template as its subject.
    """
    span = subject_span(tok, fact.query())
    for other in candidates:
        if (other.relation != fact.relation or other.subject == fact.subject
                or first_token_id(tok, other.target_true) == first_token_id(tok, fact.target_true)):
            continue
        if subject_span(tok, Query(fact.template, other.subject)) == span:
            return other.subject
    return None


def restore_state(corrupted: torch.Tensor, clean: torch.Tensor, rows: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Copy clean states into a corrupted module output; a new tensor.

    corrupted: [batch, seq, d]; clean: [seq, d] (the clean run's output of the same module);
    rows, positions: [k] each: for every i, row ``rows[i]`` gets ``clean[positions[i]]`` at ``positions[i]``.
    """
    out = corrupted.clone()
    out[rows, positions] = clean[positions].to(out.dtype)
    return out


def token_categories(span: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """Positions of each of the paper's :data:`CATEGORIES` in a prompt of ``n_tokens`` tokens.

    The subject occupies ``span = (start, end)``. Tokens before the subject are in no category. A category
    can be empty (a one-token subject has no middle tokens) and one position can be in two categories
    (the first token after the subject is often also the last token).
    """
    start, end = span
    if not 0 <= start < end <= n_tokens:
        raise ValueError(f"span {span} is not a non-empty range inside 0..{n_tokens}.")
    last = n_tokens - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end <= last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


# ----------------------------------------------------------------------------------------------------------
# Results.


@dataclass
class TraceResult:
    """The causal trace of one prompt and one kind.

    ``scores``: [n_tokens, n_layers], the answer's probability after restoring the state at (token, layer)
    (for ``"mlp"`` and ``"attn"``: a window of layers centred there), averaged over noise samples.
    """

    scores: np.ndarray
    clean_prob: float
    corrupted_prob: float
    tokens: list[str]
    subject_span: tuple[int, int]
    kind: str
    target: str
    prompt: str = ""
    window: int = 1
    noise_std: float = 0.0
    n_samples: int = 0
    replaced_by: str = ""  # symmetric token replacement: the subject put in place of the subject ("" = noise)

    @property
    def effects(self) -> np.ndarray:
        """Indirect effects: ``scores - corrupted_prob``, [n_tokens, n_layers]."""
        return self.scores - self.corrupted_prob

    @property
    def total_effect(self) -> float:
        """What the corruption took away: ``clean_prob - corrupted_prob``."""
        return self.clean_prob - self.corrupted_prob

    @property
    def shares(self) -> np.ndarray:
        """Indirect effects as a share of the total effect, [n_tokens, n_layers] (1 = all of it restored)."""
        if self.total_effect <= 0:
            raise ValueError(f"The corruption did not lower p({self.target}) for {self.prompt!r} (total effect "
                             f"{self.total_effect:.3g}): shares of it are undefined. Trace facts the model knows.")
        return self.effects / self.total_effect

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    def labels(self) -> list[str]:
        """Token labels for the heatmap's rows; subject tokens end in ``*``."""
        start, end = self.subject_span
        return [repr(t)[1:-1] + ("*" if start <= i < end else "") for i, t in enumerate(self.tokens)]

    def peak(self) -> tuple[int, int]:
        """``(token, layer)`` of the largest score."""
        i, j = np.unravel_index(int(np.argmax(self.scores)), self.scores.shape)
        return int(i), int(j)

    def plot(self, ax=None):
        """Heatmap in the paper's style: tokens down, layers across, subject tokens marked ``*``."""
        from .plots import trace_heatmap

        return trace_heatmap(self, ax=ax)


@dataclass
class AverageEffects:
    """Average indirect effect by token category and layer over many traces (facts) of one kind.

    ``mean``, ``low``, ``high``: [n_categories, n_layers]: the mean over facts and its seeded bootstrap 95%
    interval (facts resampled with replacement); ``counts``: [n_categories], how many facts had tokens in
    each category. ``share=True``: each fact's effects were divided by its total effect first.
    """

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    counts: np.ndarray
    kind: str
    window: int = 1
    share: bool = False
    n_facts: int = 0
    categories: tuple[str, ...] = field(default=CATEGORIES)

    def peak(self) -> tuple[str, int, float]:
        """``(category, layer, effect)`` of the largest average indirect effect."""
        i, j = np.unravel_index(int(np.nanargmax(self.mean)), self.mean.shape)
        return self.categories[i], int(j), float(self.mean[i, j])

    def curve(self, category: str) -> np.ndarray:
        """Average indirect effect by layer for one category: [n_layers]."""
        return self.mean[self._index(category)]

    def interval(self, category: str, layer: int) -> tuple[float, float]:
        """The 95% interval of one category at one layer."""
        i = self._index(category)
        return float(self.low[i, layer]), float(self.high[i, layer])

    def _index(self, category: str) -> int:
        if category not in self.categories:
            raise ValueError(f"Unknown category {category!r}: use one of {list(self.categories)}.")
        return self.categories.index(category)

    def plot(self, ax=None):
        """One line per category, with shaded 95% intervals and N in the legend and title."""
        from .plots import effect_lines

        return effect_lines(self, ax=ax)


def cross_fit_layer(values: np.ndarray, layers: Sequence[int] | None = None, seed: int = 0) -> np.ndarray:
    """For each fact, a layer chosen without it: the facts are split into two seeded halves, and each half is
    read at the layer (among ``layers``, default all) where the *other* half's mean peaks. values: [facts,
    layers]. Returns the chosen layer per fact, [facts] (ints); ``values[np.arange(n), chosen]`` is then an
    estimate at the peak that is not biased upward by choosing the peak on the same facts."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"cross_fit_layer needs values [facts, layers] with at least 2 facts, got {values.shape}.")
    allowed = np.asarray(range(values.shape[1]) if layers is None else list(layers), dtype=int)
    halves = np.array_split(np.random.default_rng(seed).permutation(len(values)), 2)
    chosen = np.empty(len(values), dtype=int)
    for this, other in (halves, halves[::-1]):
        chosen[this] = allowed[int(np.argmax(values[other][:, allowed].mean(axis=0)))]
    return chosen


def category_values(results: list[TraceResult], category: str,
                    share: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per trace that has a token in ``category``: its indirect effects averaged over the category's positions,
    [facts, n_layers] (each divided by the trace's total effect first if ``share``), and its total effect,
    [facts]. Traces without such a token are left out of both (so both may have 0 rows)."""
    if category not in CATEGORIES:
        raise ValueError(f"Unknown category {category!r}: use one of {list(CATEGORIES)}.")
    if not results:
        raise ValueError("category_values needs at least one TraceResult.")
    rows, totals = [], []
    for r in results:
        positions = token_categories(r.subject_span, len(r.tokens))[category]
        if positions:
            rows.append((r.shares if share else r.effects)[positions].mean(axis=0))
            totals.append(r.total_effect)
    return np.array(rows).reshape(len(rows), results[0].n_layers), np.array(totals, dtype=float)


def ratio_of_averages(effects: np.ndarray, totals: np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's kind of share: the average indirect effect divided by the average total effect (a ratio of
    averages; ``category_values(..., share=True)`` gives each trace's own ratio instead). effects: [facts, ...],
    totals: [facts].

    Returns ``(share, low, high)``, each [...]: a seeded percentile bootstrap 95% interval over the facts, each
    resampled fact bringing its indirect and its total effect together.
    """
    effects, totals = np.asarray(effects, dtype=float), np.asarray(totals, dtype=float)
    if len(effects) == 0 or len(effects) != len(totals):
        raise ValueError(f"ratio_of_averages needs one total per row of effects and at least one row, got "
                         f"{effects.shape} and {totals.shape}.")
    idx = np.random.default_rng(seed).integers(0, len(totals), size=(n_boot, len(totals)))
    boot = effects[idx].mean(axis=1) / totals[idx].mean(axis=1).reshape((n_boot,) + (1,) * (effects.ndim - 1))
    return effects.mean(axis=0) / totals.mean(), np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)


def average_effects(results: list[TraceResult], share: bool = False, n_boot: int = 1000,
                    seed: int = 0) -> AverageEffects:
    """Average the indirect effects of many traces (same kind, same number of layers) by token category.

    For each trace, a category's effect is the mean over its positions; categories a trace lacks are left
    out of that category's average. ``share=True`` divides each trace's effects by its total effect
    (``clean_prob - corrupted_prob``) first. Intervals: seeded percentile bootstrap over the traces.
    """
    if not results:
        raise ValueError("average_effects needs at least one TraceResult.")
    kinds = {r.kind for r in results}
    layers = {r.n_layers for r in results}
    if len(kinds) > 1 or len(layers) > 1:
        raise ValueError(f"Average traces of one kind and one model only (got kinds {kinds}, layers {layers}).")
    per_cat = [category_values(results, name, share)[0] for name in CATEGORIES]  # each [facts, n_layers]
    mean = np.full((len(CATEGORIES), layers.pop()), np.nan)
    low, high = mean.copy(), mean.copy()
    counts = np.array([len(v) for v in per_cat])
    for i, v in enumerate(per_cat):
        if len(v):
            mean[i] = v.mean(axis=0)
            low[i], high[i] = bootstrap_mean(v, n_boot, seed)
    return AverageEffects(mean, low, high, counts, kinds.pop(), results[0].window, share, len(results))


# ----------------------------------------------------------------------------------------------------------
# Tracing.


def _module_names(model: nn.Module, kind: str) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}: use one of {list(KINDS)}.")
    return arch(model).names(kind)


@dataclass
class _Prepared:
    input_ids: torch.Tensor      # [1, seq]
    last: int
    span: tuple[int, int]
    tokens: list[str]
    target: str
    target_id: int
    clean_prob: float
    noise: torch.Tensor          # [n_samples, span length, d]
    std: float
    replaced_by: str = ""


@torch.no_grad()
def _prepare(model, tok, query: Query, noise_std, n_samples, seed, replace_with: str | None = None) -> _Prepared:
    if not isinstance(query, Query):
        raise TypeError(f"Tracing takes a Query (e.g. fact.query() or Query('The {{}} is in', 'Eiffel Tower')), "
                        f"got {type(query).__name__}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1 (got {n_samples}); the paper uses 10.")
    device = next(model.parameters()).device
    batch, last = encode(tok, query.prompt, device)
    span = subject_span(tok, query)
    probs = torch.softmax(logits_at(model, batch, [0], [int(last[0])])[0].float(), dim=-1)
    if query.target is None:
        target_id = int(probs.argmax())
        target = tok.decode([target_id]).strip()
    else:
        target, target_id = query.target, first_token_id(tok, query.target)
    tokens = [tok.decode([int(i)]) for i in batch["input_ids"][0]]
    if replace_with is not None:  # symmetric token replacement: one deterministic corruption
        if n_samples != 1:
            raise ValueError(f"Replacing the subject with {replace_with!r} is one deterministic corruption: "
                             f"use n_samples=1 (got {n_samples}).")
        return _Prepared(batch["input_ids"], int(last[0]), span, tokens, target, target_id, float(probs[target_id]),
                         subject_replacement(model, tok, query, replace_with), 0.0, replace_with.strip())
    std = noise_level(model, tok) if noise_std is None else float(noise_std)
    d_model = model.get_input_embeddings().weight.shape[1]
    noise = make_noise(n_samples, span, d_model, std, seed).to(device)
    return _Prepared(batch["input_ids"], int(last[0]), span, tokens, target, target_id, float(probs[target_id]),
                     noise, std)


def _noise_from(p: _Prepared, start: int) -> torch.Tensor:
    """The noise of the subject positions from ``start`` on, for an input that begins at ``start``:
    [n, seq - start, d] (zero outside the subject)."""
    n, _, d = p.noise.shape
    out = torch.zeros(n, p.input_ids.shape[1] - start, d, dtype=p.noise.dtype, device=p.noise.device)
    lo = max(start, p.span[0])
    if lo < p.span[1]:
        out[:, lo - start:p.span[1] - start] = p.noise[:, lo - p.span[0]:]
    return out


@torch.no_grad()
def _corrupted_run(model, p: _Prepared):
    """The corrupted run, one row per noise sample, keeping every layer's keys and values.

    Returns ``(probs [n], cache)``: the target's probability per noise sample and the run's
    ``DynamicCache``.
    """
    from transformers import DynamicCache

    a = arch(model)
    noise = _noise_from(p, 0)
    cache = DynamicCache(config=model.config)
    # The noise is added at the first layer's input with the batch widened there, so that the attention
    # mask and positions are built for one row and broadcast over all rows (see _restored_probs).
    with trace(model, a.layer_name(0), retain_output=False, edit_input=lambda x: x + noise.to(x.dtype)):
        hidden = model.base_model(input_ids=p.input_ids, use_cache=True, **cache_kwargs(model.base_model, cache)
                                  ).last_hidden_state
    if cache.layers[0].keys is None:  # type: ignore[union-attr]
        raise RuntimeError("the model did not fill the KV cache it was given; causal tracing needs a transformers "
                           "decoder with DynamicCache support (transformers>=5.0)")
    logits = output_logits(model, hidden[:, p.last])
    return torch.softmax(logits.float(), dim=-1)[:, p.target_id], cache


@torch.no_grad()
def corrupted_probs(model: nn.Module, tok, query: Query, noise_std: float | None = None, n_samples: int = 10,
                    seed: int = 0, replace_with: str | None = None) -> torch.Tensor:
    """The answer's probability with the subject corrupted and nothing restored, per noise sample: [n_samples].

    Same noise as :func:`trace_fact` with the same ``noise_std``, ``n_samples`` and ``seed``; its mean is
    :attr:`TraceResult.corrupted_prob`. ``replace_with``: see :func:`trace_fact`.
    """
    p = _prepare(model, tok, query, noise_std, n_samples, seed, replace_with)
    return _corrupted_run(model, p)[0].cpu()


@torch.no_grad()
def _restored_probs(model, p: _Prepared, clean: dict[str, torch.Tensor], cache, t: int,
                    restorations: list[tuple[str, list[int]]]) -> torch.Tensor:
    """Target probability for restorations at token ``t``, each a ``(kind, window of layers)``; mean over
    the noise samples. [len(restorations)]

    ``clean``: the clean run's output of every restored module, ``{module name: [seq, d]}``. Only positions
    ``t..`` are computed; the keys and values of the positions before ``t`` come from the corrupted run's
    ``cache``. The batch starts as the n corrupted rows (block 0, one row per noise sample) and each
    restoration's block of n rows is split off from block 0 where it first differs: at its first restored
    layer's input (``"mlp"``, ``"attn"``), or at its restored layer's output (``"layer"``). Restorations of
    different kinds share one pass.
    """
    from transformers import DynamicCache

    a = arch(model)
    n = p.noise.shape[0]
    layer_names = a.names("layer")
    layer_index = {name: i for i, name in enumerate(layer_names)}
    # Where each restoration joins: before layer j (j = its first layer), or for "layer" after layer c,
    # i.e. before layer c + 1. Blocks are ordered by joining point.
    join = [w[-1] + 1 if kind == "layer" else w[0] for kind, w in restorations]
    order = sorted(range(len(restorations)), key=lambda r: join[r])
    rows_of = {r: torch.arange((i + 1) * n, (i + 2) * n) for i, r in enumerate(order)}  # block 0: corrupted
    joining = {j: [r for r in order if join[r] == j] for j in set(join)}
    restoring: dict[str, list[int]] = {}                     # module name -> restorations that restore it
    for r, (kind, w) in enumerate(restorations):
        for l in w:
            restoring.setdefault(a.names(kind)[l], []).append(r)

    def n_blocks_before(layer: int) -> int:                  # blocks that exist at the input of `layer`
        return 1 + sum(1 for j in join if j <= layer)

    noise = _noise_from(p, t)

    def widen(x: torch.Tensor, j: int) -> torch.Tensor:
        rs = joining.get(j, [])
        return torch.cat([x, x[:n].repeat(len(rs), 1, 1)]) if rs else x

    def edit(out: torch.Tensor, name: str) -> torch.Tensor:
        if name in layer_index:                               # a decoder layer's output: blocks join here
            out = widen(out, layer_index[name] + 1)
        if name in restoring:
            rows = torch.cat([rows_of[r] for r in restoring[name]]).to(out.device)
            out = restore_state(out, clean[name][t:], rows, torch.zeros_like(rows))
        return out

    hooked = list(dict.fromkeys([*layer_names, *restoring]))
    cache_in = None
    if t > 0:
        cache_in = DynamicCache(config=model.config)
        for l, layer in enumerate(cache.layers[:len(layer_names)]):
            k = n_blocks_before(l)
            # DynamicCache of these models holds DynamicLayers; transformers types .layers as a union of mixins
            cache_in.layers[l].update(layer.keys[:, :, :t].repeat(k, 1, 1, 1),  # type: ignore[union-attr]
                                      layer.values[:, :, :t].repeat(k, 1, 1, 1))
    with ExitStack() as stack:
        stack.enter_context(trace(model, layer_names[0], retain_output=False,
                                  edit_input=lambda x: widen(x + noise.to(x.dtype), 0)))
        stack.enter_context(trace_many(model, hooked, retain_output=False, edit_output=edit))
        hidden = model.base_model(input_ids=p.input_ids[:, t:], use_cache=cache_in is not None,
                                  **cache_kwargs(model.base_model, cache_in)).last_hidden_state
    logits = output_logits(model, hidden[n:, -1])
    probs = torch.softmax(logits.float(), dim=-1)[:, p.target_id].reshape(len(order), n).mean(dim=1).cpu()
    out = torch.empty(len(restorations))
    out[torch.tensor(order)] = probs
    return out


@torch.no_grad()
def trace_fact(
    model: nn.Module,
    tok,
    query: Query,
    kind: str = "layer",
    noise_std: float | None = None,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int = 1024,
    replace_with: str | None = None,
) -> TraceResult:
    """Causal trace of one query: restore each (token, layer) in turn; see the module docstring.

    ``query.target``: the answer (its first token is scored); ``None`` takes the model's own top prediction.
    ``kind``: ``"layer"`` (residual stream, one layer), ``"mlp"`` or ``"attn"`` (``window`` layers).
    ``noise_std``: default :func:`noise_level` (3 × the subjects' embedding std). Noise samples are shared
    by all restorations and fixed by ``seed``. At most ``batch_size`` rows (restorations × samples) per pass.
    ``replace_with``: instead of noise, corrupt by symmetric token replacement: put this other subject (same
    number of tokens) in the subject's place (:func:`subject_replacement`; needs ``n_samples=1``).
    """
    return trace_all(model, tok, query, (kind,), noise_std, n_samples, window, seed, batch_size, replace_with)[kind]


@torch.no_grad()
def trace_all(
    model: nn.Module,
    tok,
    query: Query,
    kinds: tuple[str, ...] = KINDS,
    noise_std: float | None = None,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int = 1024,
    replace_with: str | None = None,
) -> dict[str, TraceResult]:
    """:func:`trace_fact` for each of ``kinds`` (default all three): ``{kind: TraceResult}``.

    The kinds share one clean run, one corrupted run, the same noise samples and the forward passes of the
    restorations (all restorations at one token, of every kind, run as one batch), so tracing three kinds
    here is cheaper than three calls of :func:`trace_fact` and gives the same scores.
    """
    if not kinds:
        raise ValueError(f"Give at least one kind to trace, from {list(KINDS)}.")
    names = {kind: _module_names(model, kind) for kind in kinds}
    p = _prepare(model, tok, query, noise_std, n_samples, seed, replace_with)
    n_tokens, n = len(p.tokens), n_samples
    probs, cache = _corrupted_run(model, p)
    corrupted_prob = float(probs.mean())

    # The clean run, once: every restored module's output at every token, {name: [seq, d]}.
    lm: Any = model  # a transformers PreTrainedModel: nn.Module does not declare base_model
    hooked = list(dict.fromkeys(m for k in kinds for m in names[k]))
    with trace_many(model, hooked) as clean_rec:
        lm.base_model(input_ids=p.input_ids)
    clean = {m: cast(torch.Tensor, clean_rec[m].output)[0] for m in hooked}

    wins = {k: 1 if k == "layer" else window for k in kinds}
    # Every restoration at one token, all kinds: (kind, window centre, layers restored).
    todo = [(k, c, layer_window(c, len(names[k]), wins[k])) for k in kinds for c in range(len(names[k]))]
    # Tokens before the subject: the noise cannot reach them, restoring them changes nothing.
    scores = {k: torch.full((n_tokens, len(names[k])), corrupted_prob) for k in kinds}
    per_pass = max(1, batch_size // n - 1)
    for t in range(p.span[0], n_tokens):
        for start in range(0, len(todo), per_pass):
            part = todo[start:start + per_pass]
            got = _restored_probs(model, p, clean, cache, t, [(k, w) for k, _, w in part])
            for (k, c, _), value in zip(part, got):
                scores[k][t, c] = value
    return {k: TraceResult(scores[k].numpy(), p.clean_prob, corrupted_prob, p.tokens, p.span, k, p.target,
                           query.prompt, wins[k], p.std, n_samples, p.replaced_by) for k in kinds}


@torch.no_grad()
def trace_fact_plain(
    model: nn.Module,
    tok,
    query: Query,
    kind: str = "layer",
    noise_std: float | None = None,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    replace_with: str | None = None,
) -> TraceResult:
    """The paper's plain loop: one forward pass per (token, layer), batch = 1 clean row + the noise samples.

    The clean row 0 provides the states restored into rows 1..n; logits over the whole sequence. Same
    arguments and same noise as :func:`trace_fact`, so both give the same scores; this one is slower.
    """
    names = _module_names(model, kind)
    p = _prepare(model, tok, query, noise_std, n_samples, seed, replace_with)
    n_layers, n_tokens, n = len(names), len(p.tokens), n_samples
    win = 1 if kind == "layer" else window
    batch = {"input_ids": p.input_ids.expand(n + 1, -1)}
    noise = torch.cat([torch.zeros_like(p.noise[:1]), p.noise])  # row 0 stays clean

    def run(restore: dict[str, int]) -> float:
        def edit(out: torch.Tensor, name: str) -> torch.Tensor:
            if name not in restore:
                return out
            t = restore[name]
            out = out.clone()
            out[1:, t] = out[0, t]
            return out

        with trace(model, arch(model).embed, retain_output=False,
                   edit_output=lambda e: corrupt_embeddings(e, p.span, noise)), \
                trace_many(model, names, retain_output=False, edit_output=edit):
            logits = model(**batch).logits
        return float(torch.softmax(logits[1:, p.last].float(), dim=-1)[:, p.target_id].mean())

    corrupted_prob = run({})
    scores = np.zeros((n_tokens, n_layers))
    for t in range(n_tokens):
        for c in range(n_layers):
            scores[t, c] = run({names[l]: t for l in layer_window(c, n_layers, win)})
    return TraceResult(scores, p.clean_prob, corrupted_prob, p.tokens, p.span, kind, p.target, query.prompt,
                       win, p.std, n_samples, p.replaced_by)


@dataclass
class FactTraces:
    """Traces of many queries: ``results[kind]`` is one :class:`TraceResult` per query, in order."""

    queries: list[Query]
    results: dict[str, list[TraceResult]]
    seconds: float = 0.0

    def average(self, kind: str, share: bool = True, n_boot: int = 1000, seed: int = 0) -> AverageEffects:
        """:func:`average_effects` of one kind (default: as shares of each fact's total effect)."""
        if kind not in self.results:
            raise ValueError(f"Kind {kind!r} was not traced: traced kinds are {list(self.results)}.")
        return average_effects(self.results[kind], share=share, n_boot=n_boot, seed=seed)

    def averages(self, share: bool = True, n_boot: int = 1000, seed: int = 0) -> dict[str, AverageEffects]:
        """:meth:`average` for every traced kind."""
        return {k: self.average(k, share, n_boot, seed) for k in self.results}

    def total_effects(self) -> np.ndarray:
        """Each query's total effect ``clean_prob - corrupted_prob`` (from the first kind's traces): [n]."""
        first = next(iter(self.results.values()))
        return np.array([r.total_effect for r in first])


def trace_facts(model: nn.Module, tok, queries: list[Query], kinds: tuple[str, ...] = KINDS,
                progress: bool = True, seeds: list[int] | None = None, **kw) -> FactTraces:
    """:func:`trace_all` for each query, with a progress line per query; ``kw`` go to :func:`trace_all`.

    ``seeds``: one noise seed per query, so that the facts get independent noise samples (and a bootstrap
    over facts includes the noise's variation); default: ``kw["seed"]`` (or 0) for every query.
    """
    if not queries:
        raise ValueError("trace_facts needs at least one query (e.g. [f.query() for f in facts]).")
    if seeds is not None:
        if "seed" in kw:
            raise ValueError("Give either seed (the same for every query) or seeds (one per query), not both.")
        if len(seeds) != len(queries):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(queries)} queries: give one per query.")
    seeds = [kw.pop("seed", 0)] * len(queries) if seeds is None else list(seeds)
    results: dict[str, list[TraceResult]] = {k: [] for k in kinds}
    start = time.perf_counter()
    for i, (q, seed) in enumerate(zip(queries, seeds)):
        for k, r in trace_all(model, tok, q, kinds=kinds, seed=seed, **kw).items():
            results[k].append(r)
        if progress:
            print(f"\r{i + 1}/{len(queries)} traced ({time.perf_counter() - start:.0f} s)", end="", flush=True)
    if progress:
        print()
    return FactTraces(list(queries), results, time.perf_counter() - start)

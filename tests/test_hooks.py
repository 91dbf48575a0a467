"""engram_helpers.hooks: reading and patching module outputs/inputs is exact and leaves no hook behind."""

from __future__ import annotations

import pytest
import torch

from engram_helpers.hooks import get_module, replace_at, replay, trace, trace_many
from engram_helpers.models import arch

IDS = torch.tensor([[5, 17, 3, 42, 9, 11, 60, 2]])  # [1, seq]
POS = 3


def logits(model, ids=IDS):
    return model(input_ids=ids).logits


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["layer", "attn", "mlp", "mlp_out"])
def test_patching_with_own_clean_output_changes_nothing(tiny_model, kind):
    clean = logits(tiny_model)
    for name in arch(tiny_model).names(kind):
        with trace(tiny_model, name) as t:
            logits(tiny_model)
        own = t.output.clone()
        with trace(tiny_model, name, edit_output=lambda out, own=own: own.clone()):
            patched = logits(tiny_model)
        assert torch.equal(patched, clean), name
    assert n_hooks(tiny_model) == 0


@pytest.mark.parametrize("kind", ["attn", "mlp", "layer"])
def test_replacing_one_position_changes_only_that_position_and_later(tiny_model, kind):
    a = arch(tiny_model)
    name = a.names(kind)[1]
    clean = logits(tiny_model)
    d = tiny_model.config.hidden_size if hasattr(tiny_model.config, "hidden_size") else tiny_model.config.n_embd
    vector = torch.randn(1, d, generator=torch.Generator().manual_seed(1)) * 5
    with trace(tiny_model, name, edit_output=replace_at(vector, POS)) as t:
        patched = logits(tiny_model)
    assert torch.equal(t.output[0, POS], vector[0]), "the hooked output must be exactly the given vector"
    assert torch.equal(patched[0, :POS], clean[0, :POS]), "positions before the patch must not change"
    assert not torch.allclose(patched[0, POS:], clean[0, POS:]), "the patched position and later ones must change"
    with trace(tiny_model, name) as t2:
        logits(tiny_model)
    assert torch.equal(logits(tiny_model), clean), "the model must be unchanged after the block"
    assert not torch.equal(t2.output[0, POS], vector[0])


def test_replace_at_batch_rows_and_values_shape(tiny_llama):
    name = arch(tiny_llama).mlp_name(0)
    ids = IDS.repeat(2, 1)
    clean = logits(tiny_llama, ids)
    vector = torch.ones(1, tiny_llama.config.hidden_size)
    with trace(tiny_llama, name, edit_output=replace_at(vector, [POS], rows=slice(1, 2))) as t:
        patched = logits(tiny_llama, ids)
    assert torch.equal(patched[0], clean[0]), "row 0 was not selected and must be unchanged"
    assert torch.equal(t.output[1, POS], vector[0])
    assert not torch.allclose(patched[1, POS:], clean[1, POS:])


def test_hooks_removed_after_block_and_after_exception(tiny_gpt2):
    name = arch(tiny_gpt2).mlp_name(0)
    assert n_hooks(tiny_gpt2) == 0
    with trace(tiny_gpt2, name, retain_input=True, edit_output=lambda o: o):
        assert n_hooks(tiny_gpt2) == 2
    assert n_hooks(tiny_gpt2) == 0
    with pytest.raises(ZeroDivisionError):
        with trace(tiny_gpt2, name, edit_output=lambda o: o * 0):
            _ = 1 / 0
    assert n_hooks(tiny_gpt2) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with trace_many(tiny_gpt2, arch(tiny_gpt2).names("mlp"), edit_output=lambda o, n: o):
            raise RuntimeError("boom")
    assert n_hooks(tiny_gpt2) == 0


def test_edit_inside_forward_that_raises_still_removes_hooks(tiny_llama):
    def bad(_):
        raise ValueError("edit failed")

    with pytest.raises(ValueError, match="edit failed"):
        with trace(tiny_llama, arch(tiny_llama).attn_name(0), edit_output=bad):
            logits(tiny_llama)
    assert n_hooks(tiny_llama) == 0
    logits(tiny_llama)  # still runs


def test_retain_input_of_mlp_out_is_mlp_hidden(tiny_model):
    a = arch(tiny_model)
    with trace(tiny_model, a.mlp_out_name(2), retain_input=True) as t:
        logits(tiny_model)
    d_mlp = t.input.shape[-1]
    assert t.input.shape[:2] == IDS.shape
    assert d_mlp != tiny_model.config.vocab_size
    # the output projection applied to its recorded input gives its recorded output
    proj = get_module(tiny_model, a.mlp_out_name(2))
    assert torch.allclose(proj(t.input), t.output, atol=1e-6)


def test_edit_input_changes_output_exactly(tiny_model):
    a = arch(tiny_model)
    name = a.mlp_out_name(1)
    proj = get_module(tiny_model, name)
    with trace(tiny_model, name, retain_input=True) as clean:
        base = logits(tiny_model)
    with trace(tiny_model, name, retain_input=True, edit_input=lambda x: x * 0) as zeroed:
        changed = logits(tiny_model)
    assert torch.count_nonzero(zeroed.input) == 0, "the retained input is the edited one"
    bias = proj.bias if proj.bias is not None else torch.zeros(zeroed.output.shape[-1])
    assert torch.allclose(zeroed.output, bias.expand_as(zeroed.output), atol=1e-6)
    assert not torch.allclose(changed, base)
    assert torch.count_nonzero(clean.input) > 0
    with trace(tiny_model, name, edit_input=lambda x: x.clone()):
        assert torch.equal(logits(tiny_model), base), "an identity input edit changes nothing"


def test_attention_tuple_output_is_handled(tiny_model):
    """Attention modules return (output, weights); the hook reads and replaces the first element only."""
    name = arch(tiny_model).attn_name(0)
    module = get_module(tiny_model, name)
    seen = {}
    with trace(tiny_model, name, edit_output=lambda o: o * 0) as t:
        # registered after trace's hook, so it sees what the rest of the model receives
        handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("raw", out))
        try:
            logits(tiny_model)
        finally:
            handle.remove()
    assert isinstance(seen["raw"], tuple), "this test needs an attention module that returns a tuple"
    assert torch.count_nonzero(seen["raw"][0]) == 0, "the edited first element is what later modules see"
    assert t.output.shape == (1, IDS.shape[1], seen["raw"][0].shape[-1])


def test_trace_many_reads_every_layer_and_passes_names(tiny_llama):
    a = arch(tiny_llama)
    names = a.names("layer")
    got = []
    with trace_many(tiny_llama, names, edit_output=lambda o, n: (got.append(n), o)[1]) as records:
        out = tiny_llama(input_ids=IDS, output_hidden_states=True)
    assert got == names
    for i, n in enumerate(names[:-1]):  # hidden_states[i + 1] is the output of layer i (the last is normed)
        assert torch.equal(records[n].output, out.hidden_states[i + 1])


def test_detach_false_keeps_graph(tiny_llama):
    emb = get_module(tiny_llama, arch(tiny_llama).embed)
    x = emb(IDS).detach().requires_grad_(True)
    with trace(tiny_llama, arch(tiny_llama).layer_name(0), detach=False) as t:
        tiny_llama(inputs_embeds=x)
    t.output.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_module_name_is_a_clear_error(tiny_gpt2):
    with pytest.raises(ValueError, match="arch"):
        with trace(tiny_gpt2, "transformer.h.99.mlp"):
            pass


def test_stop_ends_the_forward_pass_after_the_traced_module(tiny_model):
    a = arch(tiny_model)
    ids = torch.arange(2, 9).reshape(1, -1)
    ran: list[int] = []
    handles = [get_module(tiny_model, a.layer_name(i)).register_forward_hook(lambda m, i_, o, i=i: ran.append(i))
               for i in range(a.n_layers)]
    try:
        with trace(tiny_model, a.mlp_out_name(0), retain_input=True) as full:
            tiny_model(input_ids=ids)
        ran.clear()
        result = "not run"
        with trace(tiny_model, a.mlp_out_name(0), retain_input=True, stop=True) as early:
            result = tiny_model(input_ids=ids)
        assert result == "not run" and ran == []  # layer 0's block never finished; nothing above ran
        assert torch.equal(early.input, full.input)
        with trace_many(tiny_model, [a.layer_name(1), a.layer_name(0)], stop=True) as recs:
            tiny_model(input_ids=ids)
        assert ran == [0, 1] and all(r.output is not None for r in recs.values())
    finally:
        for h in handles:
            h.remove()
    assert not tiny_model._forward_hooks and not get_module(tiny_model, a.mlp_out_name(0))._forward_hooks


def test_retain_grad_gives_the_gradient_of_a_module_output(tiny_llama):
    a = arch(tiny_llama)
    ids = torch.arange(2, 9).reshape(1, -1)
    emb = get_module(tiny_llama, a.embed)
    emb.weight.requires_grad_(True)
    try:
        with trace(tiny_llama, a.mlp_name(0), retain_grad=True) as t:
            loss = tiny_llama(input_ids=ids).logits[0, -1, 3]
        loss.backward()
        assert t.output.grad is not None and t.output.grad.shape == t.output.shape
        assert t.output.grad[0, -1].abs().sum() > 0  # the last position's logit depends on its own MLP output
    finally:
        emb.weight.requires_grad_(False)
        emb.weight.grad = None


def test_replay_skips_the_module_and_gives_the_same_result(tiny_model):
    """A layer replayed with its own recorded output does not run, the logits do not change, and the layer is
    back in place after the block (also after an error)."""
    a = arch(tiny_model)
    clean = logits(tiny_model)
    with trace_many(tiny_model, [a.layer_name(0)]) as recs:
        logits(tiny_model)
    layer0 = get_module(tiny_model, a.layer_name(0))
    ran: list[int] = []
    handle = layer0.register_forward_hook(lambda *_: ran.append(0))
    try:
        with replay(tiny_model, {a.layer_name(0): recs[a.layer_name(0)].output}):
            replayed = logits(tiny_model)
        assert ran == [] and torch.equal(replayed, clean)
        # a replayed output that differs from the real one does change the result: the recording is used
        with replay(tiny_model, {a.layer_name(0): recs[a.layer_name(0)].output * 0}):
            assert not torch.allclose(logits(tiny_model), clean)
        with pytest.raises(RuntimeError), replay(tiny_model, {a.layer_name(0): recs[a.layer_name(0)].output}):
            raise RuntimeError("inside the block")
        assert get_module(tiny_model, a.layer_name(0)) is layer0
        logits(tiny_model)
        assert ran == [0]
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="no module"):
        with replay(tiny_model, {"model.nowhere": clean}):
            pass

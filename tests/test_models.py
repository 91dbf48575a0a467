"""engram_helpers.models: architecture names, the offline default model, offline errors, safe caching."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny import tiny_model as _tiny
from torch import nn

from engram_helpers import models
from engram_helpers.hooks import get_module
from engram_helpers.models import DEFAULT_MODEL, OfflineError, arch, load_model, mlp_out_weight


def _tiny_other(kind: str):
    from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64)).eval()
    return GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                      n_positions=32)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox", "gptj"])
def test_every_arch_name_resolves_to_a_module(kind):
    model = _tiny(kind) if kind in ("gpt2", "llama") else _tiny_other(kind)
    a = arch(model)
    assert a.family == kind and a.n_layers == model.config.num_hidden_layers
    get_module(model, a.embed)
    get_module(model, a.final_norm)
    for what in ("layer", "attn", "mlp", "mlp_out"):
        names = a.names(what)
        assert len(names) == a.n_layers and len(set(names)) == a.n_layers
        for name in names:
            get_module(model, name)
    assert isinstance(get_module(model, a.embed), nn.Embedding)
    with pytest.raises(IndexError, match="layers 0.."):
        a.layer_name(a.n_layers)
    with pytest.raises(ValueError, match="Unknown kind"):
        a.names("residual")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mlp_out_weight_is_out_by_in_and_writes_through(kind):
    model = _tiny(kind)
    a = arch(model)
    w = mlp_out_weight(model, 1)
    d_model = model.config.hidden_size
    module = get_module(model, a.mlp_out_name(1))
    with torch.no_grad():
        x = torch.randn(2, w.shape[1])
        assert w.shape[0] == d_model
        assert torch.allclose(module(x), x @ w.T + (module.bias if module.bias is not None else 0), atol=1e-5)
        w[0, 0] += 1.0  # a view: editing it edits the model
    weight = module.weight.T if a.out_proj_is_conv1d else module.weight
    assert torch.equal(weight, w)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_at_are_the_models_logits_where_read(kind):
    model = _tiny(kind)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a right-padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    rows, cols = [0, 1, 1, 2], [6, 0, 4, 3]
    with torch.no_grad():
        full = model(**batch).logits
        got = models.logits_at(model, batch, rows, cols)
    assert got.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(got, full[rows, cols], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], full[1, 1])  # another position gives other logits


def test_unknown_architecture_is_a_clear_error():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))
    with pytest.raises(ValueError, match="Unsupported architecture 'bert'.*_ARCHS"):
        arch(model)
    with pytest.raises(ValueError, match="Unsupported architecture None"):
        arch(nn.Linear(2, 2))


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_hub_name_offline_fails_at_once_naming_the_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(OfflineError, match=DEFAULT_MODEL):
        load_model("gpt2-xl")
    assert time.perf_counter() - start < 5


def test_default_model_loads(default_model):
    from transformers import LlamaForCausalLM

    model, tok = default_model
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "right" and tok.pad_token is not None
    assert (models._converted_dir() / "model.safetensors").exists()


def test_second_load_is_fast_and_identical(default_model):
    model, tok = default_model
    start = time.perf_counter()
    again, tok2 = load_model()
    seconds = time.perf_counter() - start
    assert seconds < 10, f"loading the cached default model took {seconds:.1f} s"
    batch, _ = models.encode(tok, "The capital of France is")
    assert torch.equal(model(**batch).logits, again(**batch).logits)


def test_bos_prefix_is_the_separator_token_only_where_the_vocabulary_has_it():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    def word_level(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
        t = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = Whitespace()  # type: ignore[assignment]
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")

    # an unknown token maps to [UNK]'s id: that must not count as having <|endoftext|>
    assert models.bos_prefix(word_level({"[UNK]": 0, "a": 1})) == ""
    with_it = word_level({"[UNK]": 0, "a": 1, "<|endoftext|>": 2})
    with_it.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert models.bos_prefix(with_it) == "<|endoftext|>"


def test_encode_and_probabilities(default_model):
    model, tok = default_model
    batch, last = models.encode(tok, ["The capital of France is", "Paris"])
    ids = batch["input_ids"]
    assert tok.decode(ids[0, :1]) == "<|endoftext|>"
    assert last.tolist() == (batch["attention_mask"].sum(1) - 1).tolist() and last[0] > last[1]
    probs = models.next_token_probs(model, tok, ["The capital of France is", "Paris"])
    assert probs.shape == (2, model.config.vocab_size)
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-4)
    # padding must not change a prompt's prediction
    alone = models.next_token_probs(model, tok, "Paris")
    assert torch.allclose(alone[0], probs[1], atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        models.answer_ids(tok, "  ")


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


OFFLINE_SCRIPT = textwrap.dedent("""
    import socket, time
    from engram_helpers.models import DEFAULT_MODEL, OfflineError, load_model
    try:
        socket.create_connection(("pypi.org", 443), timeout=3)
        raise SystemExit("network still reachable inside unshare --net")
    except OSError:
        pass
    model, tok = load_model()
    assert model.config.num_hidden_layers == 30
    start = time.perf_counter()
    try:
        load_model("gpt2-medium")
        raise SystemExit("a Hub name loaded without network")
    except OfflineError as err:
        assert DEFAULT_MODEL in str(err), err
    print(f"OFFLINE-OK {time.perf_counter() - start:.2f}")
""")


@pytest.mark.skipif(not _unshare_works(), reason="`unshare --net` needs root (or user namespaces); "
                    "the HF_HUB_OFFLINE test above covers the offline error path")
def test_network_cut_default_loads_and_hub_name_fails_fast(default_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}  # rely on the cut network, not on the flag
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    seconds = float(out.stdout.split("OFFLINE-OK")[1])
    assert seconds < 5, f"the offline error took {seconds:.1f} s"


CONVERT_SCRIPT = textwrap.dedent("""
    from engram_helpers.models import load_model
    model, tok = load_model()
    assert model.config.num_hidden_layers == 30
""")


@pytest.mark.slow
def test_two_processes_converting_at_once(tmp_path, default_model):
    """Two fresh loads race to convert the GGUF into one empty cache: both succeed, one folder remains."""
    from safetensors.torch import load_file

    env = {**os.environ, "ENGRAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_SCRIPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    folder = tmp_path / "cache" / "models"
    assert sorted(p.name for p in folder.iterdir()) == [DEFAULT_MODEL], "no temporary folder may be left"
    weights = load_file(folder / DEFAULT_MODEL / "model.safetensors")
    model, _ = default_model
    reference = model.state_dict()
    assert set(weights) <= set(reference) and len(weights) >= len(reference) - 1  # lm_head is tied
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), f"{name} differs from the cached conversion"


def test_a_local_folder_loads_on_the_device_in_the_dtype(tmp_path, default_model):
    """A name that is no offline model goes through ``from_pretrained`` with ``device_map`` and ``dtype``
    (here a tiny model saved locally, with the default model's tokenizer)."""
    model = _tiny("llama")
    model.save_pretrained(tmp_path)
    default_model[1].save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="cpu", dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64 and next(loaded.parameters()).device.type == "cpu"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(input_ids=ids).logits, model.double()(input_ids=ids).logits, atol=1e-6)

"""Shared fixtures: tiny GPT-2 and Llama models built from configs (seeded random weights, no download),
and the real offline default model (loaded once per test session)."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--book", action="store_true", default=False,
                     help="also build the book (tests marked 'book'); run after the notebooks' nbval run")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--book"):
        return
    skip = pytest.mark.skip(reason="builds the whole book: pass --book (make test does, after nbval)")
    for item in items:
        if "book" in item.keywords:
            item.add_marker(skip)


def _tiny(kind: str, seed: int = 0):
    """A 3-layer model of ``kind`` ("gpt2" or "llama") with seeded random weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4)
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return _tiny("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny("llama")


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    """Each tiny architecture in turn (fresh copy, so a test may modify it)."""
    return _tiny(request.param)


@pytest.fixture(scope="session")
def default_model():
    """``load_model()``: the real SmolLM2-135M-Instruct, offline (converted once, then cached)."""
    from engram_helpers.models import load_model

    return load_model()

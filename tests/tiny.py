"""Tiny seeded models built from configs, shared by the tests (imported as ``from tiny import tiny_model``)."""

from __future__ import annotations

import torch


def tiny_model(kind: str, seed: int = 0):
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

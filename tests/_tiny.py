"""Tiny random decoder-only models of each supported architecture, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 128


def tiny_config(arch: str, layers: int = 2, hidden: int = 64, intermediate: int | None = None):
    inter = intermediate or 2 * hidden
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, max_position_embeddings=256
    )
    if arch == "llama":
        return LlamaConfig(
            **common, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2
        )
    if arch == "mistral":
        return MistralConfig(
            **common, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2
        )
    if arch == "qwen2":
        return Qwen2Config(
            **common, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            ffn_dim=inter,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
        )
    raise ValueError(arch)


def tiny_model(
    arch: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    intermediate: int | None = None,
):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, layers, hidden, intermediate), dtype=torch.float32
    )
    model.eval()
    return model


def tiny_tokens(n: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)

"""Tiny random decoder-only models of each supported architecture, for fast tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GemmaConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
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
    if arch == "gpt_neox":  # Pythia: parallel attention + MLP, fused query_key_value
        return GPTNeoXConfig(**common, intermediate_size=inter, num_attention_heads=4)
    if arch == "falcon":  # Falcon-7B layout: multi-query attention, parallel attention + MLP
        return FalconConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            bias=False,
        )
    if arch == "phi":  # Phi-2: dense, biases, partial rotary, parallel attention + MLP
        return PhiConfig(**common, intermediate_size=inter, num_attention_heads=4)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(
            **common,
            intermediate_size=inter,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "gemma":
        return GemmaConfig(
            **common,
            intermediate_size=inter,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
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


def tiny_tokenizer():
    """A character-level fast tokenizer with the tiny models' vocabulary (ids < VOCAB)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


SAMPLE_TEXT = (
    "Mr. Speaker, Mr. President, distinguished members of the Congress, honored guests, and fellow "
    "citizens: the state of our union is strong, and we will keep it so by work, by thrift and by "
    "the courage to meet the trials of a changing world. "
)


def save_tiny(path, arch: str = "llama", layers: int = 2, **kw):
    """A tiny model directory (safetensors + tokenizer) that ``besa-rs prune`` can load."""
    model = tiny_model(arch, layers=layers, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prune_args(model, out, calib, *extra):
    """``besa-rs prune`` arguments for a tiny model: 4 x 32 calibration tokens, quiet."""
    return [
        "prune", str(model), "--out", str(out), "--calib", str(calib),
        "--nsamples", "4", "--seqlen", "32", "--quiet", *extra,
    ]  # fmt: skip

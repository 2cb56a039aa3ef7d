"""Shared fixtures: tiny random models and a real (trained-on-the-fly) tokenizer, so fast tests
need no download and no cached model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no hub is reachable from the tests: with `datasets` installed (lm-eval needs it) a hub lookup
# would otherwise retry for ~20 s before failing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"

_CORPUS = [
    "the president spoke to the congress about the state of the union",
    "we will build a stronger economy and a safer nation for our children",
    "the people of this country have always met hard times with courage",
    "tonight i ask you to join me in a new effort to reform our schools",
] * 8


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A real word-level tokenizer (``tokenizers`` library) wrapped as a transformers fast
    tokenizer; trained on a small corpus, so it is built in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        _CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return "\n\n".join(_CORPUS)


def make_tiny_llama(vocab_size: int = 64, layers: int = 2, hidden: int = 64, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(vocab_size=len(tiny_tokenizer))


@pytest.fixture()
def tiny_llama_dir(tmp_path, tiny_llama, tiny_tokenizer) -> Path:
    d = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny random LLaMA (2 blocks), one per test module (a module may override it)."""
    from _tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("m") / "tiny-llama", "llama", layers=2)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    """A calibration text file for the tiny models."""
    from _tiny import SAMPLE_TEXT

    p = tmp_path_factory.mktemp("c") / "calib.txt"
    p.write_text(SAMPLE_TEXT * 20)
    return p

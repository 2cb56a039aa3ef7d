import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import single_thread, tiny_model, tiny_tokens  # noqa: E402, F401

from besa_rs.errors import ModelError  # noqa: E402
from besa_rs.pruning.adapters import block_output, capture_block_inputs, get_adapter, to_device  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "falcon", "phi", "phi3", "gemma"]
EXPECTED_LINEARS = {
    "llama": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "opt": [
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    ],
}
EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["llama"]
EXPECTED_LINEARS["gemma"] = EXPECTED_LINEARS["llama"]
EXPECTED_LINEARS["gpt_neox"] = EXPECTED_LINEARS["falcon"] = [
    "attention.query_key_value",
    "attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
]
EXPECTED_LINEARS["falcon"] = [
    "self_attention" + n[len("attention") :] if n.startswith("attention") else n
    for n in EXPECTED_LINEARS["gpt_neox"]
]
EXPECTED_LINEARS["phi"] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.dense",
    "mlp.fc1",
    "mlp.fc2",
]
# Phi-3 registers o_proj before the fused qkv_proj
EXPECTED_LINEARS["phi3"] = [
    "self_attn.o_proj",
    "self_attn.qkv_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_blocks_and_linears(arch):
    model = tiny_model(arch, layers=3)
    ad = get_adapter(model)
    assert len(ad) == 3
    assert list(ad.linears(0)) == EXPECTED_LINEARS[arch]
    if arch == "llama":  # grouped-query attention: k/v are narrower than q
        lin = ad.linears(0)
        assert lin["self_attn.k_proj"].out_features == lin["self_attn.q_proj"].out_features // 2


def _final_norm(model):
    """The norm applied after the last block (its name differs per architecture)."""
    for path in (
        "model.norm",
        "model.decoder.final_layer_norm",
        "model.final_layernorm",
        "gpt_neox.final_layer_norm",
        "transformer.ln_f",
    ):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError(f"no final norm found on {type(model).__name__}")


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_inputs_reproduce_the_model(arch):
    """Running the blocks by hand on the captured inputs and kwargs gives the model's own
    final hidden states (before the final norm)."""
    model = tiny_model(arch, layers=2)
    toks = tiny_tokens(n=3, seqlen=16)
    ad = get_adapter(model)
    cap = capture_block_inputs(ad, toks)
    assert len(cap.hidden) == 3 and cap.hidden[0].shape == (1, 16, 64)
    with torch.no_grad():
        ref = model(toks, output_hidden_states=True).hidden_states
        for s in range(3):
            x = cap.hidden[s]
            assert torch.allclose(x[0], ref[0][s], atol=1e-6)
            for i, block in enumerate(ad.blocks):
                args, kwargs = cap.block_args[i]
                assert "cache" not in kwargs and "past_key_values" not in kwargs
                x = block_output(block(x, *args, **kwargs))
            # the last entry of hidden_states is after the final norm; compare the penultimate
            ref_last = ref[-1][s]
            assert torch.allclose(_final_norm(model)(x[0]), ref_last, atol=1e-5)


def test_capture_restores_blocks():
    model = tiny_model("llama")
    ad = get_adapter(model)
    before = list(ad.blocks)
    capture_block_inputs(ad, tiny_tokens(n=1))
    assert list(ad.blocks) == before


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)

        class Cfg:
            model_type = "weird-conv"

        self.config = Cfg()


def test_unsupported_model_names_its_type():
    with pytest.raises(ModelError, match="weird-conv"):
        get_adapter(_NoBlocks())


def test_generic_fallback_finds_module_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Linear(8, 8)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([Block() for _ in range(3)])

            class Cfg:
                model_type = "custom"
                num_hidden_layers = 3

            self.config = Cfg()

    ad = get_adapter(Custom())
    assert ad.blocks_path == "stack" and list(ad.linears(1)) == ["ff"]


def test_to_device_nested():
    obj = {"a": (torch.ones(2), [torch.zeros(1, dtype=torch.long)]), "b": None}
    out = to_device(obj, "cpu", torch.float64)
    assert (
        out["a"][0].dtype == torch.float64
        and out["a"][1][0].dtype == torch.long
        and out["b"] is None
    )

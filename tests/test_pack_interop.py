"""Interop with the reference decoder: compressed-tensors 0.14 (installed --no-deps, test-only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from besa_rs.packing import load_packed, pack, unpack

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BitmaskCompressor, Sparse24BitMaskCompressor  # noqa: E402
from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig  # noqa: E402

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def _weights(dtype, two_four=False):
    g = torch.Generator().manual_seed(1)
    out = {}
    for i, n in enumerate(NAMES):
        w = torch.randn(24 + 8 * i, 40, generator=g)
        if two_four:
            idx = torch.rand(w.shape[0], 10, 4, generator=g).argsort(-1)[..., :2]
            mask = (
                torch.zeros(w.shape[0], 10, 4, dtype=torch.bool)
                .scatter_(-1, idx, True)
                .reshape(w.shape)
            )
        else:
            mask = torch.rand(w.shape, generator=g) < 0.45
            mask[3] = False  # an empty row
        out[n] = (w * mask).to(dtype)
    return out


def _model_dir(tmp_path, tensors):
    d = tmp_path / "m"
    d.mkdir()
    full = dict(tensors)
    full["model.norm.weight"] = torch.ones(40, dtype=next(iter(tensors.values())).dtype)
    save_file(full, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d, full


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["bitmask", "2:4"])
def test_compressed_tensors_decodes_besa_files(tmp_path, dtype, fmt):
    d, full = _model_dir(tmp_path, _weights(dtype, two_four=fmt == "2:4"))
    pack(d, tmp_path / "p", fmt)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"][
        "sparsity_config"
    ]
    comp = (
        BitmaskCompressor(config=BitmaskConfig(**cfg))
        if fmt == "bitmask"
        else Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig(**cfg))
    )
    got = dict(comp.decompress(str(tmp_path / "p")))
    assert got.keys() == full.keys()
    for k, v in full.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["bitmask", "2:4"])
def test_besa_reads_compressed_tensors_files(tmp_path, dtype, fmt):
    tensors = _weights(dtype, two_four=fmt == "2:4")
    config = BitmaskConfig() if fmt == "bitmask" else Sparse24BitMaskConfig()
    comp = (
        BitmaskCompressor(config=config)
        if fmt == "bitmask"
        else Sparse24BitMaskCompressor(config=config)
    )
    state = dict(tensors)
    state["model.norm.weight"] = torch.ones(40, dtype=dtype)
    compressed = comp.compress(state, compression_targets={n[: -len(".weight")] for n in NAMES})
    d = tmp_path / "ct"
    d.mkdir()
    save_file(
        {k: v.contiguous() for k, v in compressed.items()},
        d / "model.safetensors",
        metadata={"format": "pt"},
    )
    qc = {"quant_method": "compressed-tensors", "sparsity_config": config.model_dump()}
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    sd = load_packed(d)
    assert sd.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(sd[k], v), k
    unpack(d, tmp_path / "u")
    sd2 = load_packed(tmp_path / "u")
    for k, v in state.items():
        assert torch.equal(sd2[k], v), k

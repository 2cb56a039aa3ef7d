"""besa-rs inspect: the Rust reader on real files, sharded directories and hostile files."""

from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import besa_rs
from besa_rs.cli import main as cli
from conftest import FIXTURES


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_corrupt", FIXTURES / "make_corrupt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_corrupt = _load_generator()


def test_spec_byte_exact_vector_is_read(tmp_path):
    header = b'{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}'
    assert len(header) == 64
    f = tmp_path / "vec.safetensors"
    f.write_bytes(b"\x40" + b"\0" * 7 + header + struct.pack("<6f", *range(6)))
    rep = besa_rs.inspect(f)
    (t,) = rep["tensors"]
    assert (t["name"], t["dtype"], t["shape"], t["numel"], t["nbytes"]) == (
        "attn.0",
        "F32",
        [1, 2, 3],
        6,
        24,
    )
    assert t["zeros"] == 1 and t["sparsity"] == pytest.approx(1 / 6)
    assert rep["totals"]["file_bytes"] == 8 + 64 + 24


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_fraction_per_dtype(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 70, generator=g).to(dtype)
    w[torch.rand(33, 70, generator=g) < 0.37] = 0
    w[0, :5] = -0.0  # negative zeros count as zeros
    f = tmp_path / "m.safetensors"
    save_file(
        {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": torch.ones(70, dtype=dtype)},
        f,
    )
    rep = besa_rs.inspect(f)
    by = {t["name"]: t for t in rep["tensors"]}
    t = by["model.layers.0.mlp.up_proj.weight"]
    assert t["zeros"] == int((w == 0).sum())
    assert t["dtype"] == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    assert by["model.norm.weight"]["zeros"] == 0
    assert rep["totals"]["block_linear_sparsity"] == pytest.approx(float((w == 0).float().mean()))
    kinds = {g["kind"]: g for g in rep["groups"]}
    assert set(kinds) == {"mlp.up_proj.weight", "model.norm.weight"}


def test_integer_tensors_have_no_zero_fraction(tmp_path):
    f = tmp_path / "i.safetensors"
    save_file({"ids": torch.zeros(4, dtype=torch.int64), "empty": torch.zeros(0, 3)}, f)
    by = {t["name"]: t for t in besa_rs.inspect(f)["tensors"]}
    assert by["ids"]["zeros"] is None and by["ids"]["sparsity"] is None
    assert by["empty"]["numel"] == 0 and by["empty"]["sparsity"] == 0


def test_model_directory_single_and_sharded(tmp_path, tiny_llama):
    d1, d2 = tmp_path / "single", tmp_path / "sharded"
    tiny_llama.save_pretrained(d1)
    tiny_llama.save_pretrained(d2, max_shard_size="100KB")
    assert (d2 / "model.safetensors.index.json").is_file()
    r1, r2 = besa_rs.inspect(d1), besa_rs.inspect(d2)
    assert len(r2["files"]) > 1
    names1 = sorted(t["name"] for t in r1["tensors"])
    assert names1 == sorted(t["name"] for t in r2["tensors"])
    assert (
        r1["totals"]["numel"]
        == r2["totals"]["numel"]
        == sum(p.numel() for n, p in tiny_llama.state_dict().items() if n != "lm_head.weight")
    )


def test_sharded_index_naming_missing_shard_or_tensor(tmp_path, tiny_llama):
    d = tmp_path / "m"
    tiny_llama.save_pretrained(d, max_shard_size="100KB")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"]["ghost.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(besa_rs.FormatError, match="ghost.weight"):
        besa_rs.inspect(d)
    idx["weight_map"]["ghost.weight"] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(besa_rs.FormatError, match="not a plain file name"):
        besa_rs.inspect(d)
    idx["weight_map"]["ghost.weight"] = "model-99999-of-99999.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(besa_rs.MissingFileError, match="model-99999"):
        besa_rs.inspect(d)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(besa_rs.MissingFileError, match="nope"):
        besa_rs.inspect(tmp_path / "nope")
    with pytest.raises(besa_rs.FormatError, match="no model.safetensors"):
        besa_rs.inspect(tmp_path)


def test_corrupt_fixtures_are_what_the_generator_writes():
    for name, (data, _) in make_corrupt.CASES.items():
        assert (FIXTURES / "corrupt" / name).read_bytes() == data, name


@pytest.mark.parametrize("name", sorted(make_corrupt.CASES))
def test_corrupt_file_is_a_format_error_naming_the_file(name):
    path = FIXTURES / "corrupt" / name
    fragment = make_corrupt.CASES[name][1]
    with pytest.raises(besa_rs.FormatError) as ei:
        besa_rs.inspect(path)
    msg = str(ei.value)
    assert name in msg and fragment in msg and "\n" not in msg


def test_cli_inspect_table_json_and_errors(tmp_path, capsys):
    f = tmp_path / "a.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 8)}, f)
    assert cli(["inspect", str(f), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "self_attn.q_proj.weight" in out and "100.00%" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["totals"]["zeros"] == 32
    assert cli(["inspect", str(FIXTURES / "corrupt" / "bad_json.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("besa-rs inspect: error:") and "invalid JSON" in err and "\n" not in err


def test_large_tensor_zero_count_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1000, 1500)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    from safetensors.numpy import save_file as save_np

    f = tmp_path / "big.safetensors"
    save_np({"w": w}, f)
    (t,) = besa_rs.inspect(f)["tensors"]
    assert t["zeros"] == int((w == 0).sum())

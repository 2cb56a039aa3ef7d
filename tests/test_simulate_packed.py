"""besa-rs simulate / inspect on packed checkpoints (bitmask, CSR, 2:4): same numbers as the
dense original, read from the stored index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import besa_rs
from besa_rs.cli import main
from conftest import make_tiny_llama

FORMATS = ["bitmask", "csr", "2:4"]


def _prune(model: torch.nn.Module, fmt: str, seed: int = 0) -> None:
    """Prunes the decoder linears: ~50% at random (75% for CSR; 2 of every 4 for 2:4), with an
    all-zero row and an all-dense row (a 2:4 row for 2:4) in each matrix; one matrix is left
    dense (copied through by pack)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." not in name or p.dim() != 2:
                continue
            if name.endswith("layers.1.self_attn.o_proj.weight"):
                continue  # stays dense in the packed checkpoint
            rows, cols = p.shape
            if fmt == "2:4":
                scores = torch.rand(rows, cols // 4, 4, generator=g)
                keep = torch.zeros_like(scores, dtype=torch.bool)
                keep.scatter_(2, scores.topk(2, dim=2).indices, True)
                keep = keep.reshape(rows, cols)
            else:
                # CSR only pays off below ~50% density (it is copied through otherwise).
                keep = torch.rand(rows, cols, generator=g) < (0.25 if fmt == "csr" else 0.5)
                keep[1] = True  # all-dense row
            keep[0] = False  # all-zero row
            p.mul_(keep.to(p.dtype))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = {}
    for i, fmt in enumerate(FORMATS):
        base = tmp_path_factory.mktemp(f"simpack{i}")
        model = make_tiny_llama(hidden=64, seed=i)
        _prune(model, fmt, seed=i)
        dense = base / "dense"
        model.save_pretrained(dense)
        packed = base / "packed"
        report = besa_rs.pack(dense, packed, fmt, sync=False)
        packed_names = {p["name"] for p in besa_rs.inspect(packed)["packed"]}
        assert len(packed_names) == 2 * 7 - 1, (fmt, report)
        out[fmt] = (dense, packed)
    return out


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "path"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["reference", "full"])
def test_packed_simulates_like_dense(dirs, fmt, mode):
    dense, packed = dirs[fmt]
    a = besa_rs.simulate(dense, mode)
    b = besa_rs.simulate(packed, mode)
    assert len(a["matrices"]) == 2 * 7
    names = [m["name"] for m in b["matrices"]]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    for ma, mb in zip(a["matrices"], b["matrices"], strict=True):
        assert ma["name"] == mb["name"]
        assert mb["shape"] == ma["shape"]
        for key in ("cycles", "dense_cycles", "flops", "sparsity", "kept", "dense_columns"):
            assert mb[key] == ma[key], (ma["name"], key)
        assert mb.get("full") == ma.get("full")
    assert _strip(b) == _strip(a)
    # The pruned matrices really are sparse, the copied-through one is not.
    by = {m["name"]: m for m in b["matrices"]}
    assert by["model.layers.0.mlp.up_proj.weight"]["sparsity"] > 0.3
    assert by["model.layers.1.self_attn.o_proj.weight"]["sparsity"] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_cli_json_matches_dense(dirs, fmt, tmp_path):
    dense, packed = dirs[fmt]
    got = []
    for src in (dense, packed):
        j = tmp_path / f"{src.name}.json"
        assert main(["simulate", str(src), "--mode", "full", "--quiet", "--json", str(j)]) == 0
        got.append(json.loads(j.read_text()))
    a, b = got
    assert a["matrices"] and b["matrices"] == a["matrices"]
    assert b["totals"] == a["totals"] and b["summary"] == a["summary"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_packed(dirs, fmt, tmp_path):
    dense, packed = dirs[fmt]
    rep = besa_rs.inspect(packed)
    info = {p["name"]: p for p in rep["packed"]}
    q = info["model.layers.0.self_attn.q_proj.weight"]
    assert q["shape"] == [64, 64]
    assert q["format"] == fmt
    sim = {m["name"]: m for m in besa_rs.simulate(dense)["matrices"]}
    for name, p in info.items():
        if fmt != "2:4":  # 2:4 stores zero fillers: nnz counts them
            assert p["nnz"] == sim[name]["kept"], name
        assert p["sparsity"] == pytest.approx(1 - p["nnz"] / (p["shape"][0] * p["shape"][1]))
        assert 0 < p["packed_bytes"] < p["dense_bytes"]
    assert "model.layers.1.self_attn.o_proj.weight" not in info
    j = tmp_path / "inspect.json"
    assert main(["inspect", str(packed), "--json", str(j)]) == 0
    assert json.loads(j.read_text())["packed"] == rep["packed"]


def test_corrupt_packed_values_are_refused(dirs, tmp_path):
    import shutil
    import struct

    from besa_rs.errors import IntegrityError

    _, packed = dirs["bitmask"]
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    part = "model.layers.0.self_attn.q_proj.compressed"
    for f in sorted(bad.glob("*.safetensors")):
        data = bytearray(f.read_bytes())
        (hlen,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + hlen])
        if part in header:
            data[8 + hlen + header[part]["data_offsets"][0] + 1] ^= 0x55
            f.write_bytes(bytes(data))
            break
    else:
        raise AssertionError(f"{part} not found in {packed}")
    with pytest.raises(IntegrityError, match="q_proj"):
        besa_rs.simulate(bad)
    assert main(["simulate", str(bad), "--quiet"]) != 0

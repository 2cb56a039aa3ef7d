"""besa-rs simulate: model files, Python API, CLI, JSON, plot, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_simulate_oracle import oracle_matrix

import besa_rs
from besa_rs.cli import main
from besa_rs.errors import ConfigError, DtypeError, FormatError, MissingFileError, ShapeError
from besa_rs.simulation import dense_baseline

TYPES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def tiny_llama(
    rng: np.random.Generator, layers: int = 2, d: int = 48, ff: int = 120, dtype=np.float32
) -> dict:
    shapes = {
        "q": (d, d),
        "k": (d, d),
        "v": (d, d),
        "o": (d, d),
        "gate": (ff, d),
        "up": (ff, d),
        "down": (d, ff),
    }
    sd = {"model.embed_tokens.weight": rng.standard_normal((64, d)).astype(dtype)}
    for i in range(layers):
        sd[f"model.layers.{i}.input_layernorm.weight"] = np.ones(d, dtype=dtype)
        for t, mod in TYPES.items():
            w = rng.standard_normal(shapes[t]).astype(dtype)
            w[rng.random(w.shape) < 0.5] = 0
            sd[f"model.layers.{i}.{mod}.weight"] = w
    sd["lm_head.weight"] = rng.standard_normal((64, d)).astype(dtype)
    return sd


def test_dense_baseline_table() -> None:
    """The authors' hw_sim model (docs/simulator.md): LLaMA dense baselines (q/k/v/o/gate/up, down)."""
    for hidden, inter, qk, down in [
        (4096, 11008, 4096, 10128),
        (5120, 13824, 6400, 15936),
        (6656, 17920, 10816, 26816),
        (8192, 22016, 16384, 40512),
        (8192, 28672, 16384, 53248),
    ]:
        assert dense_baseline(hidden, hidden, "q") == qk
        assert dense_baseline(inter, hidden, "gate") == qk
        assert dense_baseline(hidden, inter, "down") == down
    assert dense_baseline(1024, 8192, "k") == 16384  # GQA k/v of 70B: not chunked


def test_model_directory_matches_oracle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sd = tiny_llama(rng)
    half = len(sd) // 2
    names = list(sd)
    save_file({k: sd[k] for k in names[:half]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    rep = besa_rs.simulate(tmp_path)
    assert rep["mode"] == "reference"
    assert len(rep["matrices"]) == 14
    assert {s["name"] for s in rep["skipped"]} >= {
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
    }
    for m in rep["matrices"]:
        cyc, flops, _ = oracle_matrix(sd[m["name"]] != 0, chunk=m["kind"] == "down")
        assert (m["cycles"], m["flops"]) == (cyc, flops), m["name"]
        assert m["dense_cycles"] == dense_baseline(*m["shape"], m["kind"])
        assert m["speedup"] == pytest.approx(m["dense_cycles"] / m["cycles"])
        assert set(m) >= {
            "name",
            "shape",
            "sparsity",
            "cycles",
            "dense_cycles",
            "flops",
            "speedup",
            "dense_columns",
            "threshold_ratios",
        }
    assert list(rep["summary"]) == ["q", "k", "v", "o", "gate", "up", "down"]
    s = rep["summary"]["down"]
    downs = [m for m in rep["matrices"] if m["kind"] == "down"]
    assert s["avg_cycles"] == pytest.approx(sum(m["cycles"] for m in downs) / 2)
    assert s["speedup"] == pytest.approx(s["dense_cycles"] / s["avg_cycles"])
    # The same through a state dict, and through bf16 torch tensors.
    by_name = {m["name"]: m["cycles"] for m in rep["matrices"]}
    rep2 = besa_rs.simulate(sd)
    assert {m["name"]: m["cycles"] for m in rep2["matrices"]} == by_name
    torch = pytest.importorskip("torch")
    sd_bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    rep3 = besa_rs.simulate(sd_bf16)
    assert {m["name"]: m["cycles"] for m in rep3["matrices"]} == by_name
    # In-memory reports name dtypes as file reports do (safetensors names).
    assert {m["dtype"] for m in rep2["matrices"]} == {"F32"}
    assert {m["dtype"] for m in rep3["matrices"]} == {"BF16"}


def test_bf16_file_and_layers_filter(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    rng = np.random.default_rng(1)
    sd = tiny_llama(rng, layers=3)
    save_torch(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()},
        str(tmp_path / "m.safetensors"),
    )
    rep = besa_rs.simulate(tmp_path / "m.safetensors", layers=r"layers\.1\..*(q_proj|down_proj)")
    assert [m["name"] for m in rep["matrices"]] == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    for m in rep["matrices"]:
        assert m["dtype"] == "BF16"
        cyc, _, _ = oracle_matrix(sd[m["name"]] != 0, chunk=m["kind"] == "down")
        assert m["cycles"] == cyc
    with pytest.raises(ConfigError):
        besa_rs.simulate(tmp_path / "m.safetensors", layers="nothing-matches")


def test_simulate_matrix_inputs() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, 90)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    w[0, 0] = -0.0
    w[1, 1] = np.nan  # kept
    ref = besa_rs.simulate_matrix(w != 0 | np.isnan(w))
    for x in (w, w.astype(np.float16), w.astype(np.float64), (w != 0) | np.isnan(w)):
        assert besa_rs.simulate_matrix(x)["cycles"] == ref["cycles"]
    torch = pytest.importorskip("torch")
    assert (
        besa_rs.simulate_matrix(torch.from_numpy(w).to(torch.bfloat16))["cycles"] == ref["cycles"]
    )
    assert besa_rs.simulate_matrix(w[:, ::2])["shape"] == [70, 45]  # non-contiguous: copied
    with pytest.raises(DtypeError):
        besa_rs.simulate_matrix(np.ones((4, 4), dtype=np.int32))
    with pytest.raises(ShapeError):
        besa_rs.simulate_matrix(np.ones(4, dtype=np.float32))
    with pytest.raises(ConfigError):
        besa_rs.simulate_matrix(w, pe_width=0)
    with pytest.raises(ConfigError):
        besa_rs.simulate_matrix(w, mode="fast")
    with pytest.raises(ConfigError):
        besa_rs.simulate_matrix(w, bandwidth_gbs=10)  # full-mode option in reference mode


def test_full_mode() -> None:
    rng = np.random.default_rng(3)
    keep = rng.random((256, 512)) < 0.5
    r = besa_rs.simulate_matrix(keep, "full", kind="up")
    f = r["full"]
    assert r["cycles"] == besa_rs.simulate_matrix(keep, kind="up")["cycles"]  # reference alongside
    assert f["bandwidth_bound"] == pytest.approx(
        f["dense_bytes"] / (f["value_bytes"] + f["metadata_bytes"])
    )
    assert f["bandwidth_bound"] == pytest.approx(1.78, abs=0.01)
    assert f["decode"]["bound"] == "memory" and f["decode"]["tokens"] == 1
    assert f["decode"]["speedup"] <= f["bandwidth_bound"] + 1e-9
    assert f["prefill"]["tokens"] == 2048
    csr = besa_rs.simulate_matrix(keep, "full", kind="up", format="csr")["full"]
    assert csr["bandwidth_bound"] < 0.7 and csr["decode"]["speedup"] < 1
    nm = besa_rs.simulate_matrix(keep, "full", kind="up", format="2:4")["full"]
    assert nm["format_ok"] is False
    two4 = np.zeros((64, 64), dtype=bool)
    two4[:, 0::4] = two4[:, 1::4] = True
    assert besa_rs.simulate_matrix(two4, "full", format="2:4")["full"]["format_ok"] is True
    fast = besa_rs.simulate_matrix(keep, "full", kind="up", bandwidth_gbs=10000, prefill_tokens=64)[
        "full"
    ]
    assert fast["decode"]["data_cycles"] < f["decode"]["data_cycles"]


def test_no_zeros_and_empty(tmp_path: Path) -> None:
    dense = np.ones((300, 300), dtype=np.float32)
    r = besa_rs.simulate_matrix(dense)
    assert r["speedup"] <= 1.0 and r["sparsity"] == 0
    save_file({"only.norm": np.ones(4, dtype=np.float32)}, str(tmp_path / "n.safetensors"))
    with pytest.raises(ConfigError, match="no 2-D weight"):
        besa_rs.simulate(tmp_path / "n.safetensors")


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError):
        besa_rs.simulate(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(FormatError):
        besa_rs.simulate(tmp_path / "junk.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError):
        besa_rs.simulate(tmp_path / "empty")
    save_file(
        {"model.layers.0.mlp.up_proj.weight": np.ones((4, 4), dtype=np.int32)},
        str(tmp_path / "i.safetensors"),
    )
    with pytest.raises(DtypeError, match="up_proj"):
        besa_rs.simulate(tmp_path / "i.safetensors")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(4)
    save_file(tiny_llama(rng), str(tmp_path / "model.safetensors"))
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    assert (
        main(
            [
                "simulate",
                str(tmp_path),
                "--quiet",
                "--json",
                str(out),
                "--plot",
                str(png),
                "--mode",
                "full",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "speed-up" in text and "down" in text and "decode" in text
    rep = json.loads(out.read_text())
    assert rep["mode"] == "full" and len(rep["matrices"]) == 14
    assert set(rep["summary"]["q"]) >= {
        "avg_cycles",
        "dense_cycles",
        "speedup",
        "decode_speedup",
        "prefill_speedup",
    }
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(
            [
                "simulate",
                str(tmp_path),
                "--quiet",
                "--pe-width",
                "32",
                "--pe-height",
                "32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["matrices"][0]["dense_cycles"] == dense_baseline(
        48, 48, pe_width=32, pe_height=32
    )
    assert main(["simulate", str(tmp_path / "nope"), "--quiet"]) == 2
    assert main(["simulate", str(tmp_path), "--quiet", "--bandwidth-gbs", "5"]) == 2
    err = capsys.readouterr().err
    assert "only with --mode full" in err


def test_hf_directory_dense_model(tiny_llama_dir: Path, tiny_llama) -> None:
    """A real save_pretrained directory (tied embeddings, GQA k/v wider than tall): no zeros,
    so no speed-up; k/v are not chunked, down is. The nn.Module gives the same report."""
    rep = besa_rs.simulate(tiny_llama_dir)
    from_module = besa_rs.simulate(tiny_llama)
    assert [(m["name"], m["cycles"]) for m in from_module["matrices"]] == [
        (m["name"], m["cycles"]) for m in rep["matrices"]
    ]
    kinds = {m["kind"] for m in rep["matrices"]}
    assert kinds == {"q", "k", "v", "o", "gate", "up", "down"}
    for m in rep["matrices"]:
        assert m["speedup"] == pytest.approx(1.0)
        assert len(m["chunks"]) == (2 if m["kind"] == "down" else 1)


@pytest.mark.slow
def test_real_model_if_available() -> None:
    """The default real model (README), when the lead's resolver finds it locally."""
    models = pytest.importorskip("besa_rs.models")
    try:
        path = models.resolve_model("smollm2-135m")
    except Exception as e:  # not downloaded / no network
        pytest.skip(f"real model not available: {e}")
    rep = besa_rs.simulate(path, "full")
    assert len(rep["matrices"]) > 0
    assert all(0.0 < m["speedup"] <= 1.01 for m in rep["matrices"])  # dense model: no gain
    assert all(m["full"]["decode"]["speedup"] <= 1.01 for m in rep["matrices"])

"""The typed Python <-> Rust boundary of the simulator: parameters checked once in Rust (a
one-line BesaError naming the parameter), reports as Python objects, errors mapped to the
classes of besa_rs.errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import besa_rs
from besa_rs import _native
from besa_rs.errors import (
    BesaError,
    ConfigError,
    DtypeError,
    FormatError,
    MissingFileError,
    ShapeError,
)
from besa_rs.simulation import dense_baseline


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    ("mode", "options", "named"),
    [
        ("reference", {"pe_width": -1}, "pe_width"),
        ("reference", {"pe_height": 0}, "pe_height"),
        ("reference", {"pe_width": "64"}, "pe_width must be an integer, got str"),
        ("reference", {"pe_width": 6.5}, "pe_width must be an integer, got float"),
        ("reference", {"start_ratio": float("nan")}, "start_ratio"),
        ("reference", {"start_ratio": "half"}, "start_ratio must be a number"),
        ("reference", {"float_mode": "f16"}, "float_mode"),
        ("reference", {"chunk_kinds": "down"}, "chunk_kinds must be a list of strings"),
        ("reference", {"bogus": 1, "also_bad": 2}, "unknown simulator option(s): also_bad, bogus"),
        ("reference", {"bandwidth_gbs": 10}, "bandwidth_gbs only apply to mode='full'"),
        ("fast", {}, "mode must be 'reference' or 'full'"),
        (3, {}, "mode must be a string, got int"),
        ("full", {"format": "coo"}, "format"),
        ("full", {"format": 24}, "format must be a string, got int"),
        ("full", {"clock_mhz": -500}, "clock_mhz"),
        ("full", {"bandwidth_gbs": 0}, "bandwidth_gbs"),
        ("full", {"value_bits": 0}, "value_bits"),
        ("full", {"index_bits": -32}, "index_bits"),
        ("full", {"prefill_tokens": 0}, "prefill_tokens"),
        ("full", {"weight_buffer_kb": -1}, "weight_buffer_kb"),
        ("full", {"output_buffer_kb": float("inf")}, "output_buffer_kb"),
    ],
)
def test_bad_parameters_name_the_parameter(mode, options, named) -> None:
    with pytest.raises(ConfigError) as e:
        _native.SimParams(mode, **options)
    assert named in _one_line(e)
    # The public API raises the same, before reading anything.
    with pytest.raises(ConfigError, match=re.escape(named)):
        besa_rs.simulate_matrix(np.ones((4, 4), dtype=bool), mode, **options)


def test_parameters_are_converted_once_in_rust() -> None:
    ref = _native.SimParams()
    assert ref.mode == "reference"
    d = ref.as_dict()
    assert d["full"] is None and d["chunk_kinds"] == ["down"]
    assert d["reference"]["pe_width"] == 64 and d["reference"]["float"] == "f32"
    full = _native.SimParams(
        "full",
        pe_width=32,
        clock_mhz=250,
        bandwidth_gbs=10.5,
        weight_buffer_kb=1.5,
        format="csr",
        value_bits=None,  # None keeps the default
    )
    f = full.as_dict()["full"]
    assert full.mode == "full"
    assert f["pe_width"] == 32 and f["clock_hz"] == 250e6 and f["bandwidth"] == 10.5e9
    assert f["weight_buffer"] == 1536 and f["format"] == "csr" and f["value_bits"] == 16
    assert "weight_buffer_kb" in _native.SIM_FULL_OPTIONS
    # The report carries the engine's parameters, as before.
    rep = besa_rs.simulate({"m": np.eye(8, dtype=np.float32)}, "full", clock_mhz=250)
    assert rep["params"]["full"]["clock_hz"] == 250e6


def test_full_mode_formats_come_from_rust() -> None:
    from besa_rs.cli import build_parser
    from besa_rs.simulation import FORMATS

    packed = {name: aliases for name, _, aliases in _native.formats()}
    assert FORMATS == _native.SIM_FORMATS and "bitmask" in FORMATS
    assert set(FORMATS) <= set(packed)
    # The CLI offers exactly these.
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    sim = sub.choices["simulate"]  # type: ignore[index]
    assert tuple(next(a for a in sim._actions if a.dest == "format").choices) == FORMATS
    two4 = np.zeros((8, 8), dtype=bool)
    two4[:, ::4] = True
    for name in FORMATS:
        for spelling in [name, *packed[name]]:
            f = besa_rs.simulate_matrix(two4, "full", format=spelling)["full"]
            assert f["format"] == name and f["format_ok"] and f["metadata_bytes"] > 0
    # A packed format the full model has no index model for is refused, naming the choices.
    for name in set(packed) - set(FORMATS):
        with pytest.raises(ConfigError) as e:
            _native.SimParams("full", format=name)
        assert f"{name} has no sparse index" in _one_line(e)
        assert ", ".join(FORMATS) in str(e.value)


def test_dense_baseline_bad_pe_array_is_a_besa_error() -> None:
    with pytest.raises(ConfigError) as e:
        dense_baseline(64, 64, pe_width=0)
    assert isinstance(e.value, BesaError) and "pe_width" in _one_line(e)
    with pytest.raises(ConfigError, match="pe_height"):
        _native.dense_baseline_cycles(64, 64, pe_height=-4)


def test_report_objects_have_the_documented_fields(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sd = {}
    for i in range(2):
        for mod, shape in [("self_attn.q_proj", (16, 16)), ("mlp.down_proj", (16, 40))]:
            w = rng.standard_normal(shape).astype(np.float32)
            w[rng.random(shape) < 0.5] = 0
            sd[f"model.layers.{i}.{mod}.weight"] = w
    sd["model.layers.0.input_layernorm.weight"] = np.ones(16, dtype=np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    seen: list[dict] = []
    for model in (tmp_path, sd):
        seen.clear()
        rep = besa_rs.simulate(model, "full", on_matrix=seen.append)
        assert isinstance(rep, dict)
        assert set(rep) == {"mode", "path", "params", "matrices", "summary", "totals", "skipped"}
        assert rep["mode"] == "full"
        assert [m["name"] for m in rep["matrices"]] == [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ]
        assert sorted(m["name"] for m in seen) == sorted(m["name"] for m in rep["matrices"])
        m = rep["matrices"][1]
        assert m["kind"] == "down" and m["layer"] == 0 and m["shape"] == [16, 40]
        assert isinstance(m["cycles"], int) and isinstance(m["speedup"], float)
        assert isinstance(m["threshold_ratios"], list) and len(m["chunks"]) == 3
        assert m["chunks"][0]["cols"] == [0, 16]
        assert set(m["full"]) >= {"format", "bandwidth_bound", "decode", "prefill"}
        assert set(m["full"]["decode"]) >= {"tokens", "cycles", "speedup", "bound"}
        assert list(rep["summary"]) == ["q", "down"]
        assert set(rep["summary"]["q"]) >= {
            "matrices",
            "avg_cycles",
            "dense_cycles",
            "speedup",
            "decode_speedup",
            "prefill_speedup",
            "bandwidth_bound",
        }
        assert set(rep["totals"]) >= {"matrices", "cycles", "dense_cycles", "speedup", "sparsity"}
        assert rep["skipped"] == [
            {
                "name": "model.layers.0.input_layernorm.weight",
                "reason": "1-D tensor (only 2-D weights are simulated)",
            }
        ]
    # Reference mode: no full-mode keys.
    rep = besa_rs.simulate(sd)
    assert "full" not in rep["matrices"][0] and "decode_speedup" not in rep["totals"]
    assert rep["path"] == "dict"


def test_progress_callback_error_stops_the_run(tmp_path: Path) -> None:
    sd = {f"model.layers.{i}.mlp.up_proj.weight": np.eye(8, dtype=bool) for i in range(6)}
    save_file(sd, str(tmp_path / "m.safetensors"))

    class Stop(Exception):
        pass

    def boom(m: dict) -> None:
        raise Stop(m["name"])

    for model in (tmp_path / "m.safetensors", sd):
        with pytest.raises(Stop):
            besa_rs.simulate(model, on_matrix=boom)


def test_arrays_are_read_in_place_or_in_row_major_order() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 70)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    ref = besa_rs.simulate_matrix(w)
    fortran = np.asfortranarray(w)
    assert besa_rs.simulate_matrix(fortran)["cycles"] == ref["cycles"]
    assert besa_rs.simulate_matrix(fortran)["flops"] == ref["flops"]
    assert besa_rs.simulate_matrix(w.T.copy().T)["cycles"] == ref["cycles"]
    params = _native.SimParams()
    with pytest.raises(DtypeError, match="m: the F64 weight came as a numpy array of dtype"):
        _native.simulate_matrix(w, "F64", params, name="m")
    with pytest.raises(DtypeError, match="m: dtype I8 is not supported by the simulator"):
        _native.simulate_matrix(w.astype(np.int8), "I8", params, name="m")
    with pytest.raises(DtypeError, match='m: unknown dtype "int8"'):
        _native.simulate_matrix(w.astype(np.int8), "int8", params, name="m")
    with pytest.raises(DtypeError, match="m: expected a numpy array, got list"):
        _native.simulate_matrix([[1.0]], "F32", params, name="m")
    with pytest.raises(
        ShapeError, match=re.escape("m: expected a 2-D weight or mask, got shape [3]")
    ):
        _native.simulate_matrix(np.ones(3, np.float32), "F32", params, name="m")


def test_errors_are_the_classes_of_besa_rs_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as e:
        besa_rs.simulate(tmp_path / "nope")
    assert type(e.value) is MissingFileError
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(FormatError) as e2:
        besa_rs.inspect(tmp_path / "junk.safetensors")
    assert type(e2.value) is FormatError
    report = besa_rs.inspect(_small(tmp_path))
    assert isinstance(report, dict) and report["tensors"][0]["name"] == "w"


def _small(tmp_path: Path) -> Path:
    p = tmp_path / "small.safetensors"
    save_file({"w": np.eye(4, dtype=np.float32)}, str(p))
    return p


def _keys(td: type) -> tuple[set[str], set[str]]:
    return set(td.__required_keys__), set(td.__optional_keys__)  # type: ignore[attr-defined]


def _check(obj: dict, td: type) -> None:
    required, optional = _keys(td)
    assert required <= set(obj) <= required | optional, (td.__name__, set(obj) ^ required)


def test_typed_report_shapes_match_the_engine() -> None:
    """besa_rs.sim_report describes exactly what the Rust engine returns."""
    from besa_rs import sim_report as t

    rng = np.random.default_rng(5)
    sd = {"model.layers.0.mlp.down_proj.weight": rng.random((16, 40)) < 0.5}
    for mode in ("reference", "full"):
        rep = besa_rs.simulate(sd, mode)
        _check(rep, t.SimReport)
        _check(rep["params"], t.Params)
        _check(rep["params"]["reference"], t.RefParams)
        _check(rep["totals"], t.Totals)
        _check(rep["skipped"][0] if rep["skipped"] else {"name": "", "reason": ""}, t.Skipped)
        for s in rep["summary"].values():
            _check(s, t.TypeSummary)
        for m in rep["matrices"]:
            _check(m, t.MatrixReport)
            for c in m["chunks"]:
                _check(c, t.Chunk)
                _check(c["best"], t.Eval)
        if mode == "full":
            _check(rep["params"]["full"], t.FullParams)
            f = rep["matrices"][0]["full"]
            _check(f, t.FullResult)
            _check(f["decode"], t.Step)
            assert set(rep["totals"]) == set().union(*_keys(t.Totals))
        else:
            assert set(rep["totals"]) == _keys(t.Totals)[0]


def test_state_dicts_are_fetched_a_batch_at_a_time() -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
    arrays = {n: np.eye(8, dtype=np.float32) for n in names}
    fetched: list[str] = []
    fetched_when_reported: list[int] = []

    def fetch(n: str) -> tuple[np.ndarray, str]:
        fetched.append(n)
        return arrays[n], "F32"

    rep = _native.simulate_arrays(
        "sd",
        [(n, [8, 8], "F32") for n in names],
        fetch,
        _native.SimParams(),
        on_matrix=lambda m, total: fetched_when_reported.append(len(fetched)),
        batch=2,
    )
    assert sorted(fetched) == sorted(names) and len(fetched) == 6
    assert fetched_when_reported == [2, 2, 4, 4, 6, 6]
    assert rep["path"] == "sd" and len(rep["matrices"]) == 6

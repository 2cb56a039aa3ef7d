"""Typed stubs of the Rust extension ``besa_rs._native`` (checked by mypy.stubtest).

Each section belongs to one binding module of ``rust/besa-py/src``.
"""

import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, final

import numpy as np
import numpy.typing as npt

from besa_rs.sim_report import MatrixReport, Mode, Params, SimReport

__version__: str
# Keep in sync with the functions below (stubtest checks it).
__all__ = [
    "__version__",
    "inspect",
    "SIM_FULL_OPTIONS",
    "SIM_FORMATS",
    "SimParams",
    "compress_parts",
    "decompress_parts",
    "dense_baseline_cycles",
    "simulate_arrays",
    "simulate_matrix",
    "simulate_path",
    "pack",
    "unpack",
    "PackedReader",
    "formats",
    "FLOAT_DTYPES",
    "recover_leftovers",
    "make_partial_dir",
    "commit_dir",
    "crash_point",
    "check_out",
]

# --- inspect.rs ---
def inspect(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]: ...

# --- sim.rs (SimParams: sim_params.rs; arrays: arrays.rs) ---
#: Names of the full-mode options of SimParams, in CLI help order.
SIM_FULL_OPTIONS: tuple[str, ...]
#: Storage formats of the full model (the packed formats whose index it models).
SIM_FORMATS: tuple[str, ...]

#: safetensors dtype names of a weight or mask handed to the simulator ("BF16": its bits as
#: uint16).
_WeightDtype = Literal["BOOL", "F16", "BF16", "F32", "F64"]
#: Called with each matrix report (in completion order) and the number of matrices selected.
_OnMatrix = Callable[[MatrixReport, int], object]

# --- memory.rs ---
# (name, dtype name, shape, the bytes as a flat uint8 array)
_Buf = tuple[str, str, list[int], npt.NDArray[np.uint8]]

def compress_parts(
    data: npt.NDArray[np.uint8],
    dtype: str,
    rows: int,
    cols: int,
    format: str,
    force_24: bool = False,
) -> list[_Buf]: ...
def decompress_parts(
    parts: list[tuple[str, str, list[int], npt.NDArray[np.uint8]]],
    format: str | None = None,
) -> tuple[str, _Buf]: ...

@final
class SimParams:
    """Simulator parameters, checked once in Rust (a ConfigError names the bad option)."""

    def __new__(
        cls,
        mode: Mode | None = None,
        *,
        pe_width: int = 64,
        pe_height: int = 64,
        start_ratio: float = 0.5,
        float_mode: Literal["f32", "f64"] = "f32",
        chunk_kinds: Sequence[str] = ("down",),
        clock_mhz: float | None = None,
        bandwidth_gbs: float | None = None,
        value_bits: int | None = None,
        act_bits: int | None = None,
        index_bits: int | None = None,
        format: str | None = None,  # one of SIM_FORMATS (or an alias)
        prefill_tokens: int | None = None,
        weight_buffer_kb: float | None = None,
        index_buffer_kb: float | None = None,
        input_buffer_kb: float | None = None,
        output_buffer_kb: float | None = None,
    ) -> SimParams: ...
    @property
    def mode(self) -> Mode: ...
    def as_dict(self) -> Params: ...

def simulate_path(
    path: str | os.PathLike[str],
    params: SimParams,
    layers: re.Pattern[str] | None = None,
    on_matrix: _OnMatrix | None = None,
) -> SimReport: ...
def simulate_arrays(
    label: str,
    tensors: Sequence[tuple[str, Sequence[int], str]],
    fetch: Callable[[str], tuple[object, _WeightDtype | str]],
    params: SimParams,
    layers: re.Pattern[str] | None = None,
    on_matrix: _OnMatrix | None = None,
    batch: int | None = None,
) -> SimReport: ...
def simulate_matrix(
    array: object,  # a 2-D numpy array of dtype `dtype` (BF16: uint16 bits)
    dtype: _WeightDtype | str,
    params: SimParams,
    name: str = "matrix",
    kind: str | None = None,
) -> MatrixReport: ...
def dense_baseline_cycles(
    rows: int, cols: int, chunk: bool = False, pe_width: int = 64, pe_height: int = 64
) -> int: ...

# --- sparse.rs ---
def pack(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: str = "bitmask",
    min_sparsity: float = 0.25,
    shard_size: int = 5_000_000_000,
    overwrite: bool = False,
    force_24: bool = False,
    tensors: list[str] | None = None,
    sync: bool = True,
) -> dict[str, Any]: ...
def unpack(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shard_size: int = 5_000_000_000,
    overwrite: bool = False,
    sync: bool = True,
) -> dict[str, Any]: ...
def formats() -> list[tuple[str, str, list[str]]]: ...

#: safetensors names of the float dtypes (weights that are packed and simulated).
FLOAT_DTYPES: tuple[str, ...]

def recover_leftovers(out: str | os.PathLike[str]) -> list[str]: ...
def make_partial_dir(out: str | os.PathLike[str]) -> str: ...
def commit_dir(
    tmp: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overwrite: bool = False,
    sync: bool = True,
) -> None: ...
def crash_point(step: str) -> None: ...
def check_out(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> None: ...

@final
class PackedReader:
    def __new__(cls, path: str | os.PathLike[str]) -> PackedReader: ...
    def tensors(self) -> list[tuple[str, str, list[int], str | None, int]]: ...
    def declared_format(self) -> str | None: ...
    def is_packed(self) -> bool: ...
    def read_into(self, name: str, out: npt.NDArray[np.uint8]) -> None: ...
    def packed_info(self) -> list[dict[str, Any]]: ...

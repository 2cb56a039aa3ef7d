"""Typed stubs of the Rust extension ``besa_rs._native`` (checked by mypy.stubtest).

Each section belongs to one binding module of ``rust/besa-py/src``.
"""

import os
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
# Keep in sync with the functions below (stubtest checks it).
__all__ = [
    "__version__",
    "inspect_json",
    "compress_parts",
    "decompress_parts",
    "SimSource",
    "default_params_json",
    "dense_baseline_cycles",
    "plan_json",
    "simulate_array_json",
    "summarize_json",
    "pack_json",
    "unpack_json",
    "PackedReader",
    "formats",
    "recover_leftovers",
    "make_partial_dir",
    "commit_dir",
    "crash_point",
    "check_out",
]

# --- inspect.rs ---
def inspect_json(path: str | os.PathLike[str], verify: bool = True) -> str: ...

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

# --- sim.rs ---
@final
class SimSource:
    """A model opened for simulation (safetensors file or directory, memory-mapped)."""

    def __new__(cls, path: str | os.PathLike[str]) -> SimSource: ...
    def describe(self) -> str: ...
    def plan_json(self) -> str: ...
    def simulate_json(self, names: list[str], params_json: str) -> str: ...

def simulate_array_json(
    array: object,  # C-contiguous 2-D numpy array of bool/uint8/uint16/uint32/uint64
    elem: str,
    name: str,
    kind: str,
    dtype: str,
    params_json: str,
) -> str: ...
def summarize_json(matrices_json: str) -> str: ...
def plan_json(tensors_json: str) -> str: ...
def default_params_json() -> str: ...
def dense_baseline_cycles(
    rows: int, cols: int, chunk: bool = False, pe_width: int = 64, pe_height: int = 64
) -> int: ...

# --- sparse.rs ---
def pack_json(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: str = "bitmask",
    min_sparsity: float = 0.25,
    shard_size: int = 5_000_000_000,
    overwrite: bool = False,
    force_24: bool = False,
    tensors: list[str] | None = None,
    sync: bool = True,
) -> str: ...
def unpack_json(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shard_size: int = 5_000_000_000,
    overwrite: bool = False,
    sync: bool = True,
) -> str: ...
def formats() -> list[tuple[str, str, list[str]]]: ...
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
    def packed_info_json(self) -> str: ...

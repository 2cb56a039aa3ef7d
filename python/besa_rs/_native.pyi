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
    "pack_json",
    "unpack_json",
    "PackedReader",
]

# --- inspect.rs ---
def inspect_json(path: str | os.PathLike[str]) -> str: ...

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

@final
class PackedReader:
    def __new__(cls, path: str | os.PathLike[str]) -> PackedReader: ...
    def tensors(self) -> list[tuple[str, str, list[int], str | None, int]]: ...
    def declared_format(self) -> str | None: ...
    def is_packed(self) -> bool: ...
    def read_into(self, name: str, out: npt.NDArray[np.uint8]) -> None: ...
    def packed_info_json(self) -> str: ...

"""Typed stubs of the Rust extension ``besa_rs._native`` (checked by mypy.stubtest).

Each section belongs to one binding module of ``rust/besa-py/src``.
"""

import os
from typing import final

__version__: str
# Keep in sync with the functions below (stubtest checks it).
__all__ = [
    "__version__",
    "inspect_json",
    "SimSource",
    "default_params_json",
    "dense_baseline_cycles",
    "plan_json",
    "simulate_array_json",
    "summarize_json",
]

# --- inspect.rs ---
def inspect_json(path: str | os.PathLike[str]) -> str: ...

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

"""Typed stubs of the Rust extension ``besa_rs._native`` (checked by mypy.stubtest).

Each section belongs to one binding module of ``rust/besa-py/src``.
"""

import os

__version__: str
# Keep in sync with the functions below (stubtest checks it).
__all__ = [
    "__version__",
    "inspect_json",
]

# --- inspect.rs ---
def inspect_json(path: str | os.PathLike[str]) -> str: ...

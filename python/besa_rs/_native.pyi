"""Typed stubs of the Rust extension ``besa_rs._native`` (checked by mypy.stubtest).

Each section belongs to one binding module of ``rust/besa-py/src``.
"""

import os

__version__: str

# --- inspect.rs ---
def inspect_json(path: str | os.PathLike[str]) -> str: ...

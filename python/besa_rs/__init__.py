"""besa-rs: BESA pruning for LLMs with a Rust core.

Heavy submodules (torch, transformers) load lazily on first use of their names, so that
``import besa_rs`` and Rust-only commands stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BesaError,
    BesaIOError,
    ConfigError,
    DataError,
    DistributedError,
    DtypeError,
    FormatError,
    IntegrityError,
    MissingFileError,
    ModelError,
    NumericalError,
    ShapeError,
)

__version__ = "0.1.0"

#: public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "prune": "pruning",
    "prune_streamed": "pruning.streaming",
    "PruneConfig": "pruning",
    "inspect": "inspection",
    "evaluate_perplexity": "evaluate",
    "evaluate_tasks": "tasks",
    "load_model": "models",
    "load_tokenizer": "models",
    "resolve_model": "models",
    "load_text": "data",
    "sotu_split": "data",
    "simulate": "simulation",
    "simulate_matrix": "simulation",
    "pack": "packing",
    "unpack": "packing",
    "load_packed": "packing",
    "from_packed": "packing",
    "compress": "memory",
    "decompress": "memory",
    "ste_mask": "ste",
    "hard_mask": "ste",
    "row_ranks": "ste",
    "candidate_sparsities": "ste",
}

if TYPE_CHECKING:
    from .data import load_text, sotu_split
    from .evaluate import evaluate_perplexity
    from .inspection import inspect
    from .memory import compress, decompress
    from .models import load_model, load_tokenizer, resolve_model
    from .packing import from_packed, load_packed, pack, unpack
    from .pruning import PruneConfig, prune
    from .pruning.streaming import prune_streamed
    from .simulation import simulate, simulate_matrix
    from .ste import candidate_sparsities, hard_mask, row_ranks, ste_mask
    from .tasks import evaluate_tasks


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'besa_rs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"besa_rs.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BesaError",
    "BesaIOError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "DtypeError",
    "FormatError",
    "IntegrityError",
    "MissingFileError",
    "ModelError",
    "NumericalError",
    "ShapeError",
    "__version__",
    # lazy (see _LAZY)
    "evaluate_perplexity",
    "evaluate_tasks",
    "inspect",
    "load_model",
    "load_text",
    "load_tokenizer",
    "resolve_model",
    "simulate",
    "simulate_matrix",
    "sotu_split",
    "pack",
    "unpack",
    "load_packed",
    "from_packed",
    "compress",
    "decompress",
    "ste_mask",
    "prune",
    "prune_streamed",
    "PruneConfig",
    "hard_mask",
    "row_ranks",
    "candidate_sparsities",
]

"""Pruning methods by name: each method module registers how it prunes one block
(:class:`Method`), and the sequential driver looks the method up here for a config, so the driver
imports no method. The built-in methods' modules are imported on the first look-up; another
module can add a method with :func:`register`.

A method may register variants: a variant has the same name and a predicate ``when(cfg)``, and
is chosen over the plain method when its predicate holds (BESA with ``wbits`` and sparsity 0 is
learned clipping alone, :mod:`besa_rs.pruning.quant`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import PruneConfig
    from .context import BlockContext

#: modules that register the built-in methods (imported on the first look-up)
BUILTIN_MODULES = (
    "besa_rs.pruning.uniform",  # magnitude, wanda, sparsegpt
    "besa_rs.pruning.besa",  # besa
    "besa_rs.pruning.quant",  # besa with wbits and sparsity 0: learned clipping alone
)


@dataclass(frozen=True)
class Method:
    """How a method prunes one block, and what the driver has to prepare for it."""

    name: str
    #: prunes ``ctx.block`` in place; returns the block's report (``{"layers": [...], ...}``)
    prune_block: Callable[[BlockContext], dict[str, Any]]
    #: whether the method reads the block's calibration inputs (magnitude alone does not)
    reads_inputs: Callable[[PruneConfig], bool] = lambda cfg: True
    #: learned in optimisation steps (progress counted in steps, not layers)
    learned: bool = False
    #: supports ``prune_dense`` (targets from the dense chain, ``ctx.xd``)
    dense_chain: bool = False
    #: supports N:M structures
    structured: bool = False
    #: a variant: chosen over the plain method of the same name when this holds
    when: Callable[[PruneConfig], bool] | None = None


_METHODS: dict[str, Method] = {}
_VARIANTS: dict[str, list[Method]] = {}
_loaded = False


def register(method: Method) -> Method:
    """Adds ``method`` (or a variant of it, when ``method.when`` is set); returns it."""
    if method.when is None:
        _METHODS[method.name] = method
    else:
        _VARIANTS.setdefault(method.name, []).append(method)
    return method


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)


def method_names() -> tuple[str, ...]:
    """Names of the registered methods."""
    _load_builtins()
    return tuple(_METHODS)


def method_for(cfg: PruneConfig) -> Method:
    """The method (or the variant of it) that prunes with ``cfg``."""
    _load_builtins()
    base = _METHODS.get(cfg.method)
    if base is None:
        raise ConfigError(f"unknown method {cfg.method!r}: expected one of {', '.join(_METHODS)}")
    for v in _VARIANTS.get(cfg.method, []):
        assert v.when is not None
        if v.when(cfg):
            return v
    return base

"""Pruning: BESA (blockwise learned sparsity allocation) and the uniform baselines (magnitude,
Wanda, SparseGPT), run sequentially block by block on calibration activations. Methods are
found by name in :mod:`besa_rs.pruning.registry` (docs/pruning.md, "Code layout")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import METHODS, METRICS, OPTIMIZERS, PruneConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["METHODS", "METRICS", "OPTIMIZERS", "PruneConfig", "prune"]


def prune(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    config: PruneConfig | None = None,
    checkpoint: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Prunes ``model`` in place on ``calib_tokens`` (LongTensor ``[nsamples, seqlen]``) with
    ``config`` (default: BESA row-wise at 50%); keyword ``overrides`` replace config fields
    (``prune(model, toks, method="wanda", sparsity=0.6)``). Returns the run report: settings,
    per block the loss curve, time and per linear layer learned / hard / realised sparsity, and
    totals."""
    import dataclasses

    from .sequential import run_pruning

    cfg = dataclasses.replace(config or PruneConfig(), **overrides)
    return run_pruning(model, calib_tokens, cfg, checkpoint=checkpoint)

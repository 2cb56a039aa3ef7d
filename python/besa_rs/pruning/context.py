"""What a pruning method gets to prune one block (:class:`BlockContext`): the block on the
compute device, its linear layers, the calibration inputs produced by the blocks pruned before
it, the settings, and helpers to run the block on those inputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import block_output
from .config import PruneConfig
from .stats import gather_stats


@dataclass
class BlockContext:
    """Everything a method needs to prune one block."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    device: torch.device
    xs: list[torch.Tensor]  # pruned-chain inputs X_p, one [1, L, H] tensor per sample
    xd: list[torch.Tensor] | None  # dense-chain inputs X_d (prune_dense only)
    cfg: PruneConfig
    cache_device: torch.device
    cache_dtype: torch.dtype
    compute_dtype: torch.dtype
    progress: Any = None
    previous: dict[str, Any] | None = None  # the previous block's report (e.g. its loss scale)
    # filled by the method
    next_xd: list[torch.Tensor] | None = None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda" and self.compute_dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor, block: nn.Module | None = None) -> torch.Tensor:
        """Runs the block (or ``block``) on a batch already on the device."""
        with self.autocast():
            out = (block or self.block)(x, *self.args, **self.kwargs)
        return block_output(out)

    def batch(self, xs: list[torch.Tensor], sl: slice) -> torch.Tensor:
        return torch.cat(xs[sl], dim=0).to(device=self.device, dtype=self.compute_dtype)

    def store(self, y: torch.Tensor) -> list[torch.Tensor]:
        return [
            t.unsqueeze(0) for t in y.detach().to(device=self.cache_device, dtype=self.cache_dtype)
        ]

    @torch.no_grad()
    def run_all(self, xs: list[torch.Tensor], batch: int = 1) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for s in range(0, len(xs), batch):
            out.extend(self.store(self.forward(self.batch(xs, slice(s, s + batch)))))
        return out

    @torch.no_grad()
    def run_with_stats(
        self, xs: list[torch.Tensor], norms: bool, hessian: bool, keep_outputs: bool
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        outs: list[torch.Tensor] = []
        with gather_stats(self.linears, norms, hessian) as stats:
            for s in range(len(xs)):
                y = self.forward(self.batch(xs, slice(s, s + 1)))
                if keep_outputs:
                    outs.extend(self.store(y))
        return stats, outs

"""Input statistics of a block's linear layers, gathered with forward hooks while the block runs
on calibration activations: squared column norms (Wanda) and Hessians ``2/n sum x x^T``
(SparseGPT, reconstruction)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class LinearStats:
    """Accumulates statistics of one linear layer's input ``x`` (all tokens of all samples)."""

    def __init__(self, linear: nn.Linear, norms: bool, hessian: bool):
        cols = linear.in_features
        dev = linear.weight.device
        self.ntokens = 0
        self.sq_norm = torch.zeros(cols, dtype=torch.float32, device=dev) if norms else None
        self.hessian = torch.zeros(cols, cols, dtype=torch.float32, device=dev) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        if self.sq_norm is not None:
            self.sq_norm += (x * x).sum(dim=0)
        if self.hessian is not None:
            # running mean of 2 x x^T over tokens: H = 2/n sum x x^T
            self.hessian *= self.ntokens / (self.ntokens + t)
            xs = x * (2.0 / (self.ntokens + t)) ** 0.5
            self.hessian += xs.t() @ xs
        self.ntokens += t


@contextmanager
def gather_stats(
    linears: dict[str, nn.Linear], norms: bool, hessian: bool
) -> Iterator[dict[str, LinearStats]]:
    """Hooks every linear layer of ``linears`` while the ``with`` body runs the block."""
    stats = {name: LinearStats(lin, norms, hessian) for name, lin in linears.items()}
    handles = []
    for name, lin in linears.items():
        st = stats[name]

        def hook(
            _mod: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor, st: LinearStats = st
        ) -> None:
            st.add(inp[0])

        handles.append(lin.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()

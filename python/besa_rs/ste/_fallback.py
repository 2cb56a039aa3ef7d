"""Vectorised PyTorch implementation of the straight-through mask (any device).

Works in row chunks of about ``_CHUNK_ELEMS`` elements so that the only full-size tensor it
allocates is the output itself (and, in backward, the weight gradient when one is asked for).
Every chunk is processed by a handful of whole-tensor torch ops: there is no Python loop over
rows, only over chunks of rows.
"""

from __future__ import annotations

import torch

#: elements per chunk (4 MiB of fp32 temporaries per live buffer)
_CHUNK_ELEMS = 1 << 20


def _chunk_rows(rows: int, cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(cols, 1))


def masked_weight(
    weight: torch.Tensor, ranks: torch.Tensor, n_prune_rows: torch.Tensor
) -> torch.Tensor:
    """``weight * (ranks >= n_prune_rows[:, None])``, chunked (values only, no autograd)."""
    rows, cols = weight.shape
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    step = _chunk_rows(rows, cols)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        keep = ranks[a:b] >= n_prune_rows[a:b, None]
        torch.where(keep, weight[a:b], zero, out=out[a:b])
    return out


def hard_mask(ranks: torch.Tensor, n_prune_rows: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask ``ranks >= n_prune_rows[:, None]``."""
    return ranks >= n_prune_rows[:, None].to(ranks.dtype)


def soft_weight(
    weight: torch.Tensor | None,
    ranks: torch.Tensor,
    w: torch.Tensor,
    lut: torch.Tensor,
    rows_per_group: int,
) -> torch.Tensor:
    """Values of ``weight * P`` (or ``P`` when ``weight`` is None), chunked.

    ``P(k) = 1 - S[m(k)]`` where ``S[j] = sum_{d<j} w_d`` (candidates sorted by descending prune
    count) and ``m(k) = lut[k]`` is the number of candidates that prune rank ``k``.
    """
    rows, cols = ranks.shape
    acc = w.dtype
    # keep[g, j] = 1 - sum_{d<j} w[g, d], j = 0..D
    prefix = torch.cumsum(w, dim=1)
    keep = torch.cat([torch.ones_like(w[:, :1]), 1.0 - prefix], dim=1)
    out_dtype = acc if weight is None else torch.promote_types(weight.dtype, acc)
    out = torch.empty((rows, cols), dtype=out_dtype, device=ranks.device)
    step = _chunk_rows(rows, cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        grp = torch.arange(a, b, device=ranks.device) // rows_per_group
        bucket = lut[ranks[a:b].long()]
        p = keep[grp[:, None], bucket]
        if weight is not None:
            p = p * weight[a:b].to(acc)
        out[a:b] = p
    return out


def bucket_sums(
    grad: torch.Tensor,
    weight: torch.Tensor | None,
    ranks: torch.Tensor,
    lut: torch.Tensor,
    n_buckets: int,
    acc: torch.dtype,
) -> torch.Tensor:
    """``H[r, j] = sum over columns c of row r with lut[ranks[r, c]] == j of grad*weight``.

    Accumulated in ``acc`` (fp32, or fp64 for fp64 inputs). Each chunk scatters ``grad*weight``
    into rank order (ranks are a permutation of each row, so the scatter has no collisions and is
    deterministic), then sums it per bucket with ``index_add_`` along the columns.
    """
    rows, cols = ranks.shape
    h = torch.zeros((rows, n_buckets), dtype=acc, device=grad.device)
    step = _chunk_rows(rows, cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        gw = grad[a:b].to(acc)
        if weight is not None:
            gw = gw * weight[a:b].to(acc)
        in_rank_order = torch.empty_like(gw).scatter_(1, ranks[a:b].long(), gw)
        del gw
        h[a:b].index_add_(1, lut, in_rank_order)
    return h


def masked_grad(
    grad: torch.Tensor, ranks: torch.Tensor, n_prune_rows: torch.Tensor
) -> torch.Tensor:
    """``grad * hard`` (gradient w.r.t. the weight), chunked."""
    return masked_weight(grad, ranks, n_prune_rows)

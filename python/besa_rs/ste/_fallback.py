"""Vectorised PyTorch implementation of the straight-through mask (any device).

Works in row chunks of about ``_CHUNK_ELEMS`` elements so that the only full-size tensor it
allocates is the output itself (and, in backward, the weight gradient when one is asked for).
Every chunk is processed by a handful of whole-tensor torch ops: there is no Python loop over
rows, only over chunks of rows.

Determinism. Two sums of the backward have a fast form that is deterministic on the CPU only:
the per-bucket sums (``index_add_``, atomics on CUDA) and the suffix sums over candidates
(``cumsum``, listed as non-deterministic on CUDA by ``torch.use_deterministic_algorithms``). On
any other device (or with :data:`FORCE_DETERMINISTIC`) they are computed without either op: the
rank-ordered values are gathered into one zero-padded segment per bucket and reduced with
``sum`` (a fixed-order reduction), and the suffix sums are a Hillis-Steele scan of shifted
elementwise adds. The values of a row are put into rank order by ``scatter_`` with a permutation
(no two sources share a target, so the result is unique whatever the order of the writes).
So gradients are bit-identical run to run on CUDA too; on the CPU the fast forms are kept
(bit-identical to before), and the two forms agree to float rounding.
"""

from __future__ import annotations

import torch

#: ``None``: the deterministic forms on every device but the CPU; ``True``/``False``: always /
#: never (tests run the CUDA path on the CPU with ``True``)
FORCE_DETERMINISTIC: bool | None = None


def deterministic_path(device: torch.device) -> bool:
    """Whether the backward on ``device`` uses the deterministic forms (see module doc)."""
    if FORCE_DETERMINISTIC is not None:
        return FORCE_DETERMINISTIC
    return device.type != "cpu"


def prefix_sums(x: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums along dim 1 of a small ``[G, D]`` tensor: ``cumsum`` on the CPU,
    a Hillis-Steele scan of elementwise adds (deterministic everywhere) on other devices."""
    if not deterministic_path(x.device):
        return torch.cumsum(x, dim=1)
    n = x.shape[1]
    s = x.clone()
    shift = 1
    while shift < n:
        t = s.clone()
        t[:, shift:] += s[:, : n - shift]
        s = t
        shift *= 2
    return s


def suffix_sums(x: torch.Tensor) -> torch.Tensor:
    """``S[:, j] = sum_{i >= j} x[:, i]`` (see :func:`prefix_sums`)."""
    return prefix_sums(x.flip(1)).flip(1)


#: elements per chunk: 16 MiB per live fp32 temporary (64 MiB at most in backward). Smaller
#: chunks save memory but multiply the number of parallel regions; on a busy 2-core machine
#: 256k-element chunks were 3-5x slower than 4M-element ones.
_CHUNK_ELEMS = 1 << 22


def _chunk_rows(rows: int, cols: int) -> int:
    return max(1, _CHUNK_ELEMS // max(cols, 1))


def masked_weight(
    weight: torch.Tensor, ranks: torch.Tensor, n_prune_rows: torch.Tensor
) -> torch.Tensor:
    """``weight * (ranks >= n_prune_rows[:, None])``, chunked (values only, no autograd).

    A multiply by the boolean mask (not ``torch.where``, which is 3x slower on CPU): pruned
    entries become ``weight * 0``, i.e. zero with the weight's sign, as in the reference.
    """
    rows, cols = weight.shape
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    step = _chunk_rows(rows, cols)
    keep = torch.empty((min(step, rows), cols), dtype=torch.bool, device=weight.device)
    n = n_prune_rows.to(ranks.dtype)[:, None]
    for a in range(0, rows, step):
        b = min(rows, a + step)
        k = keep[: b - a]
        torch.ge(ranks[a:b], n[a:b], out=k)
        torch.mul(weight[a:b], k, out=out[a:b])
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
    prefix = prefix_sums(w)
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


def _bucket_segments(lut: torch.Tensor, n_buckets: int) -> tuple[torch.Tensor, int]:
    """Gather index ``[n_buckets * S]`` listing, for every bucket ``j``, the rank positions
    ``k`` with ``lut[k] == j`` in increasing order, padded to ``S`` (the largest bucket) with
    the index ``C`` of a zero column. Built on the CPU (``C`` integers) and moved once."""
    lut_c = lut.detach().to("cpu", torch.int64)
    cols = lut_c.numel()
    counts = torch.bincount(lut_c, minlength=n_buckets)
    width = max(int(counts.max()), 1)
    order = torch.argsort(lut_c, stable=True)  # bucket by bucket, increasing k inside each
    starts = torch.cumsum(counts, 0) - counts
    s = torch.arange(width)
    pos = starts[:, None] + s[None, :]
    valid = s[None, :] < counts[:, None]
    idx = torch.where(valid, order[pos.clamp_max(cols - 1)], torch.full_like(pos, cols))
    return idx.reshape(-1).to(lut.device), width


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
    deterministic), then sums it per bucket: with ``index_add_`` along the columns on the CPU,
    or, on other devices (:func:`deterministic_path`), by gathering each bucket's rank positions
    into a zero-padded ``[rows, n_buckets, S]`` segment tensor and reducing its last dim.
    """
    rows, cols = ranks.shape
    dev = grad.device
    det = deterministic_path(dev)
    h = torch.zeros((rows, n_buckets), dtype=acc, device=dev)
    width_all = cols
    if det:
        seg_idx, width = _bucket_segments(lut, n_buckets)
        width_all = max(cols + 1, n_buckets * width)
    step = max(1, _CHUNK_ELEMS // max(width_all, 1))
    # buffers reused by every chunk: no allocator churn, no fresh pages to fault in
    shape = (min(step, rows), cols)
    idx_buf = torch.empty(shape, dtype=torch.int64, device=dev)
    gw_buf = torch.empty(shape, dtype=acc, device=dev)
    # deterministic path: one extra zero column, the target of the segments' padding
    rank_order = torch.zeros((shape[0], cols + int(det)), dtype=acc, device=dev)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        idx, gw, ro = idx_buf[: b - a], gw_buf[: b - a], rank_order[: b - a]
        idx.copy_(ranks[a:b])
        if weight is None:
            gw.copy_(grad[a:b])
        elif grad.dtype == acc and weight.dtype == acc:
            torch.mul(grad[a:b], weight[a:b], out=gw)
        else:  # widen first: the product of two half values is exact in fp32
            gw.copy_(grad[a:b]).mul_(weight[a:b])
        if det:
            ro[:, :cols].scatter_(1, idx, gw)
            seg = ro.index_select(1, seg_idx).view(b - a, n_buckets, -1)
            h[a:b] = seg.sum(dim=2)
        else:
            ro.scatter_(1, idx, gw)
            h[a:b].index_add_(1, lut, ro)
    return h


def masked_grad(
    grad: torch.Tensor, ranks: torch.Tensor, n_prune_rows: torch.Tensor
) -> torch.Tensor:
    """``grad * hard`` (gradient w.r.t. the weight), chunked."""
    return masked_weight(grad, ranks, n_prune_rows)

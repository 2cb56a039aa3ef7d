"""Bucket codes: one byte per weight in place of its rank (BESA's low-memory path on the CPU).

The straight-through mask (:mod:`besa_rs.ste`) needs two things from a weight's rank ``k``
within its row:

* its gradient only needs the rank's *bucket* ``m(k) = #{d : t_d > k}``, the number of
  candidate sparsities that prune it (``0 .. D``, with ``t_d`` the candidates' prune counts);
* its value, the hard mask ``k >= n`` for a row's prune count ``n``, needs the rank itself only
  inside the one bucket that ``n`` falls in: every weight of a higher bucket (a lower rank) is
  pruned, every weight of a lower bucket kept.

So a layer stores the buckets (``uint8``, ``D + 1 <= 256``: candidate steps down to 1/254; the
default 0.01 gives 102 buckets) instead of int16 ranks: half the memory (0.20 instead of
0.40 GB for a LLaMA-7B block). The order inside the boundary bucket is recovered when a mask is
made, from the importance scores the ranks were sorted by (recomputed row by row: they are an
elementwise function of the frozen weight and the block's statistics): in each row, the
bucket's members are sorted by (importance, column), as the stable sort of the whole row orders
them, and the ``n - t`` lowest are pruned. The masks are therefore exactly those of the ranks
(tests/test_codes.py checks every prune count against the ranks).

The gradient's per-bucket sums are ``scatter_add`` over the codes, one row chunk at a time:
the same terms as the ranks' path summed in column order instead of rank order, so gradients
agree with it to float rounding, not bit for bit.

:class:`RowChunkedLinear` is the layer that uses them: ``y = x (W * M)^T`` made a chunk of
output rows at a time, in the forward and again in the backward, so neither the masked weight
nor its gradient ever exists whole (the checkpointed path holds one layer's of each: 0.18 GB on
a LLaMA-7B MLP layer in bfloat16). The boundary of each chunk is resolved once per step, in the
forward, and its kept members' indices (a few bytes per row) are reused by the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..errors import ConfigError, ShapeError
from . import _candidate_order, _fallback, candidate_weights, prune_counts

#: elements per row chunk of the mask and of the chunked linear layer: about 0.5 M weights, so
#: a chunk's temporaries (bf16 weight and gradient, fp32 products, int64 codes) stay near 10 MB.
#: On a LLaMA-7B-shaped block this peaked 0.02 GB lower than 2 M-weight chunks at the same speed
#: (``benches/memory.py``; the mask op's time is the same, ``tests`` use smaller chunks)
CHUNK_ELEMS = 1 << 19
#: most buckets a byte holds: candidate lists of up to 255 sparsities
MAX_BUCKETS = 256


def chunk_rows(cols: int) -> int:
    return max(1, CHUNK_ELEMS // max(cols, 1))


def fits(n_candidates: int) -> bool:
    """Whether ``n_candidates`` candidates give at most :data:`MAX_BUCKETS` buckets."""
    return n_candidates + 1 <= MAX_BUCKETS


class BucketCodes:
    """A layer's rank buckets (``uint8 [R, C]``) and what it takes to resolve a boundary.

    ``importance_rows(a, b)`` gives rows ``a:b`` of the importance the ranks are sorted by
    (ascending, stable: rank 0 is the least important, ties keep column order); it must give
    the same values at every call.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        importance_rows: Callable[[int, int], torch.Tensor],
        t_sorted: torch.Tensor,
    ) -> None:
        rows, cols = codes.shape
        self.codes = codes
        self.importance_rows = importance_rows
        self.shape = (rows, cols)
        d = t_sorted.shape[0]
        t = t_sorted.to("cpu", torch.int64)
        #: lowest rank of bucket j (t_j; bucket D starts at rank 0) and its size
        self.low = torch.cat([t, torch.zeros(1, dtype=torch.int64)])
        high = torch.cat([torch.tensor([cols], dtype=torch.int64), t])
        self.size = high - self.low
        #: bucket of every rank 0..C (a prune count of C lies in bucket 0)
        k = torch.arange(cols + 1)
        self.bucket_of = d - torch.searchsorted(t.flip(0).contiguous(), k, right=True)
        self.n_buckets = d + 1

    @classmethod
    def build(
        cls,
        importance_rows: Callable[[int, int], torch.Tensor],
        shape: Sequence[int],
        device: torch.device | str,
        candidates: torch.Tensor,
    ) -> BucketCodes:
        """Codes of an importance matrix of ``shape`` given by row ranges (the ranks of
        :func:`besa_rs.ste.row_ranks_by_chunks`, a chunk of rows at a time: no whole-layer
        rank tensor is made)."""
        if len(shape) != 2:
            raise ShapeError(f"importance must be [R, C], got shape {tuple(shape)}")
        rows, cols = int(shape[0]), int(shape[1])
        if not fits(candidates.shape[0]):
            raise ConfigError(
                f"{candidates.shape[0]} candidates need {candidates.shape[0] + 1} buckets, "
                f"more than a byte holds ({MAX_BUCKETS}): use the ranks' path"
            )
        dev = torch.device(device)
        co = _candidate_order(candidates, cols, dev)
        out = cls(
            torch.empty((rows, cols), dtype=torch.uint8, device=dev), importance_rows, co.t_sorted
        )
        lut = out.bucket_of[:cols].to(device=dev, dtype=torch.uint8)
        step = chunk_rows(cols)
        src = torch.arange(cols, device=dev).expand(min(step, rows), cols)
        order_buf = torch.empty((min(step, rows), cols), dtype=torch.int64, device=dev)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            order = torch.sort(importance_rows(a, b), dim=1, stable=True).indices
            # rank of every column, then its bucket
            ranks = order_buf[: b - a]
            ranks.scatter_(1, order, src[: b - a])
            del order
            out.codes[a:b] = lut[ranks]
        return out

    def keep(
        self,
        n_rows: torch.Tensor,
        a: int = 0,
        b: int | None = None,
        boundary: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean keep-mask of rows ``a:b`` (``rank >= n_rows[r]``; ``n_rows`` holds every
        row's prune count, ``[R]``), exactly the ranks' mask. ``boundary``: those rows'
        :meth:`boundary_kept` for the same counts, when already known."""
        rows, cols = self.shape
        b = rows if b is None else b
        step = chunk_rows(cols)
        if b - a > step:  # a chunk of rows at a time: one chunk's importance, not the layer's
            out = torch.empty((b - a, cols), dtype=torch.bool, device=self.codes.device)
            for i in range(a, b, step):
                out[i - a : min(b, i + step) - a] = self.keep(n_rows, i, min(b, i + step))
            return out
        j, _ = self._boundary_bucket(n_rows, a, b)
        keep = self.codes[a:b] < j.to(device=self.codes.device, dtype=torch.uint8)[:, None]
        if boundary is None:
            boundary = self.boundary_kept(n_rows, a, b)
        keep.view(-1)[boundary] = True
        return keep

    def _boundary_bucket(
        self, n_rows: torch.Tensor, a: int, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows ``a:b``: the bucket ``j`` holding each row's prune count ``n`` and how many
        of its members are pruned, ``q = n - t_j`` (int64, on the CPU)."""
        n = n_rows[a:b].to("cpu", torch.int64).clamp(0, self.shape[1])
        j = self.bucket_of[n]
        return j, n - self.low[j]

    def boundary_kept(self, n_rows: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Flat indices (into rows ``a:b``, row-major, int64) of the kept members of each
        row's boundary bucket: the bucket's ``size - q`` most important, where ``q = n - t``
        of them are pruned (by (importance, column), the stable sort's order)."""
        cols = self.shape[1]
        dev = self.codes.device
        j, q = self._boundary_bucket(n_rows, a, b)
        sel = self.codes[a:b] == j.to(device=dev, dtype=torch.uint8)[:, None]
        full = q >= self.size[j]  # the whole bucket pruned: nothing of it kept
        if bool(full.any()):
            sel &= ~full.to(dev)[:, None]
        r, col = sel.nonzero(as_tuple=True)
        del sel
        if r.numel() == 0:
            return r
        qd = q.to(dev)
        if bool((qd[r] > 0).any()):  # some rows keep only part of the bucket: order it
            v = self.importance_rows(a, b)[r, col]
            # (row, importance, column) order: stable sorts, the last by row
            o = torch.sort(v, stable=True).indices
            o = o[torch.sort(r[o], stable=True).indices]
            r, col = r[o], col[o]
            counts = torch.bincount(r, minlength=b - a)
            start = torch.cumsum(counts, 0) - counts
            kept = torch.arange(r.shape[0], device=dev) - start[r] >= qd[r]
            r, col = r[kept], col[kept]
        return r * cols + col


class _CodesMaskFn(torch.autograd.Function):
    """``W * keep`` in value; gradient to the per-row candidate weights ``w`` [rows, D] as in
    :func:`besa_rs.ste.ste_mask` (bucket sums of ``g * W``, negated suffix sums)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: torch.Tensor,
        w_rows: torch.Tensor,
        codes: torch.Tensor,
        keep: torch.Tensor,
        n_buckets: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, codes)
        ctx.n_buckets = n_buckets
        ctx.acc = w_rows.dtype
        return weight * keep

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weight, codes = ctx.saved_tensors
        gw = grad.to(ctx.acc).mul_(weight)  # widened first: a product of halves is exact
        h = torch.zeros((weight.shape[0], ctx.n_buckets), dtype=ctx.acc, device=grad.device)
        h.scatter_add_(1, codes.long(), gw)
        del gw
        suffix = _fallback.suffix_sums(h)
        return None, -suffix[:, 1:], None, None, None


class MaskedLayer:
    """What a row chunk of one layer's masked (and fake-quantized) weight is made from, for one
    step: frozen weight, codes, prune counts per row, and an optional quantizer
    ``quant(weight_rows, clip_rows)``."""

    def __init__(
        self,
        weight: torch.Tensor,
        codes: BucketCodes,
        n_rows: torch.Tensor,
        quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.weight = weight
        self.codes = codes
        self.n_rows = n_rows
        self.quant = quant
        self._boundary: dict[tuple[int, int], torch.Tensor] = {}

    def rows(self, a: int, b: int, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows ``a:b`` of the masked weight from the matching rows of the parameters:
        ``params[0]`` per-row candidate weights ``[b - a, D]``, ``params[1]`` (with a quantizer)
        clipping logits ``[2, b - a, groups]``. Each chunk's boundary decisions are kept for
        the step (the backward makes the same rows again: a few bytes per row)."""
        boundary = self._boundary.get((a, b))
        if boundary is None:
            boundary = self._boundary[(a, b)] = self.codes.boundary_kept(self.n_rows, a, b)
        keep = self.codes.keep(self.n_rows, a, b, boundary)
        m = _CodesMaskFn.apply(
            self.weight[a:b], params[0], self.codes.codes[a:b], keep, self.codes.n_buckets
        )
        if self.quant is not None:
            m = self.quant(m, params[1])
        return m  # type: ignore[no-any-return]


#: the dimension that indexes a weight row in each parameter of :meth:`MaskedLayer.rows`
ROW_DIMS = (0, 1)


class RowChunkedLinear(torch.autograd.Function):
    """``F.linear(x, W_masked, bias)`` with ``W_masked`` made a chunk of output rows at a time
    by ``layer.rows`` in the forward and again in the backward; the gradients reach ``params``
    (whose row dimensions are :data:`ROW_DIMS`) chunk by chunk. ``release`` runs after the
    layer's forward and after its backward (the heap release of the lean path)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        layer: MaskedLayer,
        release: Callable[[], Any] | None,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        rows, cols = layer.weight.shape
        if x.shape[-1] != cols:
            raise ShapeError(f"input has {x.shape[-1]} features, the layer takes {cols}")
        x2 = x.reshape(-1, cols)
        y = torch.empty((x2.shape[0], rows), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for a, b in _chunks(rows, cols):
                wc = layer.rows(
                    a,
                    b,
                    [
                        p.narrow(d, a, b - a)
                        for p, d in zip(params, ROW_DIMS[: len(params)], strict=True)
                    ],
                )
                y[:, a:b] = x2 @ wc.to(x.dtype).t()
                del wc
            if bias is not None:
                y += bias.to(y.dtype)
        if release is not None:
            release()
        ctx.save_for_backward(x2, *params)
        ctx.layer = layer
        ctx.release = release
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], rows)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, *params = ctx.saved_tensors
        layer: MaskedLayer = ctx.layer
        rows, cols = layer.weight.shape
        gy2 = gy.reshape(-1, rows)
        need_x = ctx.needs_input_grad[0]
        acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
        gx = torch.zeros((x2.shape[0], cols), dtype=acc, device=x2.device) if need_x else None
        grads = [
            torch.zeros_like(p) if ctx.needs_input_grad[4 + i] else None
            for i, p in enumerate(params)
        ]
        for a, b in _chunks(rows, cols):
            leaves = [
                p.narrow(d, a, b - a).detach().requires_grad_(g is not None)
                for p, d, g in zip(params, ROW_DIMS[: len(params)], grads, strict=True)
            ]
            with torch.enable_grad():
                wc = layer.rows(a, b, leaves)
            g = gy2[:, a:b]
            if gx is not None:
                gx.addmm_(g.to(acc), wc.detach().to(acc))
            want = [(i, leaf) for i, leaf in enumerate(leaves) if grads[i] is not None]
            if want and wc.requires_grad:
                gw = g.t().to(wc.dtype) @ x2.to(wc.dtype)  # the weight's gradient, these rows
                got = torch.autograd.grad(wc, [leaf for _, leaf in want], gw, allow_unused=True)
                for (i, _), gi in zip(want, got, strict=True):
                    if gi is not None:
                        grads[i].narrow(ROW_DIMS[i], a, b - a).copy_(gi)  # type: ignore[union-attr]
                del gw, got
            del wc, leaves
        if ctx.release is not None:
            ctx.release()
        gx_out = None if gx is None else gx.to(x2.dtype).view(ctx.x_shape)
        return (gx_out, None, None, None, *grads)


def _chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = chunk_rows(cols)
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


class StepPlan(NamedTuple):
    """One step's small quantities of a layer (:func:`step_plan`)."""

    #: per-row candidate weights ``[R, D]`` in the buckets' order, differentiable in the logits
    w_rows: torch.Tensor
    #: prune count of every row, int64 ``[R]``
    n_rows: torch.Tensor
    #: expected sparsity of every group ``[G]``, differentiable in the logits (the same values
    #: as :func:`besa_rs.ste.expected_sparsity`)
    alpha: torch.Tensor


def step_plan(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    smoothing: bool,
    rows: int,
    cols: int,
) -> StepPlan:
    """This step's per-row candidate weights, prune counts and expected sparsities, as
    :func:`besa_rs.ste.ste_mask` and :func:`besa_rs.ste.expected_sparsity` compute them (one
    softmax for both)."""
    groups = logits.shape[0]
    if groups == 0 or rows % groups:
        raise ShapeError(
            f"logits have G = {groups} groups, which does not divide the R = {rows} rows"
        )
    k = rows // groups
    w = candidate_weights(logits, smoothing)
    co = _candidate_order(candidates, cols, w.device)
    cand = candidates.detach().to(w.device, w.dtype)
    alpha = (w * cand).sum(-1)
    n_rows = prune_counts(alpha, cols).repeat_interleave(k)
    w_sorted = w if co.identity else w.index_select(1, co.order)
    w_rows = w_sorted if k == 1 else w_sorted.repeat_interleave(k, dim=0)
    return StepPlan(w_rows, n_rows, alpha)


def layer_forward(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    layer: MaskedLayer,
    params: Sequence[torch.Tensor],
    release: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """:class:`RowChunkedLinear` applied."""
    return RowChunkedLinear.apply(x, bias, layer, release, *params)  # type: ignore[no-any-return]

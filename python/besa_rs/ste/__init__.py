"""Straight-through sparsity mask of BESA (the paper's steps 5-9; docs/ste_mask.md), fused.

For a weight ``W`` of shape ``[R, C]`` whose entries have been ranked within their row by
ascending importance (``ranks``, rank 0 = least important), learnable ``logits`` of shape
``[G, D]`` and candidate sparsities ``p`` of length ``D``:

* ``w = softmax(sigmoid(logits))`` (or ``softmax(logits)``) per group, in fp32;
* ``alpha = sum_d w_d p_d`` per group (expected sparsity);
* hard mask: in each row prune the ``n_prune = floor(alpha * C)`` lowest ranks, ``floor`` taken
  of the fp32 product ``alpha * C`` (``torch.floor(alpha * C)`` with ``alpha`` fp32);
* candidate prune counts ``t_d = floor(p_d * C)`` computed exactly in integers after snapping
  ``p_d`` to the 1e-6 grid (``(round(p_d * 1e6) * C) // 1e6``), so that e.g. ``0.29 * 100``
  gives 29 and not 28 as the float product would;
* soft keep-probability of rank ``k``: ``P(k) = 1 - sum_{d : k < t_d} w_d``;
* ``ste_mask`` returns ``W * M`` with ``M = hard`` in value and ``d M / d w = d P / d w``.

Granularity follows from ``G``: ``G == R`` row-wise, ``G == 1`` layer-wise (each row still
prunes ``floor(alpha * C)`` of its own weights), otherwise rows ``[i*k, (i+1)*k)`` with
``k = R // G`` share group ``i``.

The backward never builds the candidate-to-column map nor a full-size soft mask: with
``m(k) = #{d : t_d > k}`` (the number of candidates that prune rank ``k``),
``dL/dw_d = -sum_{r in group} sum_{c : m(rank[r, c]) > d} g[r, c] W[r, c]``, i.e. per-row bucket
sums of ``g * W`` over ``D + 1`` rank buckets followed by a suffix sum over the buckets. See
docs/ste_mask.md.

Two implementations: a CUDA extension compiled on first use (``backend() == "cuda-ext"``) and a
vectorised, chunked torch fallback used on CPU or when the extension cannot be built.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..errors import ConfigError, DtypeError, ShapeError
from . import _ext, _fallback

__all__ = [
    "backend",
    "candidate_prune_counts",
    "candidate_sparsities",
    "candidate_weights",
    "expected_sparsity",
    "hard_mask",
    "prune_counts",
    "rank_dtype",
    "row_ranks",
    "row_ranks_by_chunks",
    "soft_mask",
    "ste_mask",
]

_RANK_DTYPES = (torch.int16, torch.int32, torch.int64)
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: candidate sparsities are snapped to this grid before computing floor(p * C) exactly
_GRID = 1_000_000
#: elements per row chunk when ranking: one chunk's importance, sort values and int64 sort
#: indices take 16 + 16 + 32 MiB (the whole 11008 x 4096 layer's would take 0.54 GB)
_RANK_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------
# small per-group quantities
# --------------------------------------------------------------------------------------------
def candidate_sparsities(step: float = 0.01) -> torch.Tensor:
    """Candidate sparsities ``1.00, 1 - step, ..., 0.00`` (float32, descending).

    ``1 / step`` must be (within 1e-6) an integer ``N``; the values are ``i / N`` for
    ``i = N .. 0`` computed in float64 and rounded once to float32, so ``D = N + 1``.
    """
    if not (isinstance(step, (int, float)) and math.isfinite(step) and 0.0 < step <= 1.0):
        raise ConfigError(f"candidate step must be in (0, 1], got {step!r}")
    n = round(1.0 / step)
    if abs(n * step - 1.0) > 1e-6:
        raise ConfigError(f"candidate step {step!r} does not divide 1 (1/step = {1.0 / step!r})")
    return (torch.arange(n, -1, -1, dtype=torch.float64) / n).to(torch.float32)


def candidate_weights(logits: torch.Tensor, smoothing: bool = True) -> torch.Tensor:
    """Weights over candidates ``softmax(sigmoid(logits))`` (or ``softmax(logits)``), ``[G, D]``.

    Computed in fp32 (fp64 if the logits are fp64).
    """
    if logits.dim() != 2:
        raise ShapeError(f"logits must be [G, D], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise DtypeError(f"logits must be floating point, got {logits.dtype}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    if smoothing:
        x = torch.sigmoid(x)
    return torch.softmax(x, dim=-1)


def _alpha(w: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return (w * candidates.to(device=w.device, dtype=w.dtype)).sum(-1)


def expected_sparsity(
    logits: torch.Tensor, candidates: torch.Tensor, smoothing: bool = True
) -> torch.Tensor:
    """Expected sparsity ``alpha = sum_d w_d p_d`` per group, ``[G]`` (differentiable)."""
    _check_candidates(candidates, logits.shape[-1] if logits.dim() == 2 else -1)
    return _alpha(candidate_weights(logits, smoothing), candidates)


def prune_counts(alpha: torch.Tensor, cols: int) -> torch.Tensor:
    """``floor(alpha * cols)`` per group as int64, the product taken in ``alpha``'s dtype."""
    return torch.floor(alpha.detach() * cols).clamp_(0, cols).to(torch.int64)


def candidate_prune_counts(candidates: torch.Tensor, cols: int) -> torch.Tensor:
    """Exact ``t_d = floor(p_d * cols)`` (int64) after snapping ``p_d`` to the 1e-6 grid."""
    q = torch.round(candidates.detach().to(torch.float64) * _GRID).to(torch.int64)
    return torch.div(q * cols, _GRID, rounding_mode="floor").clamp_(0, cols)


def rank_dtype(cols: int) -> torch.dtype:
    """The narrowest rank dtype that holds ``0 .. cols`` (prune counts reach ``cols``): int16
    below 32768 columns (every LLaMA-size layer), else int32. Ranks are integers: the mask and
    its gradient are the same whatever their dtype, and int16 halves their memory."""
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def row_ranks(importance: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Rank of each entry within its row by ascending importance (stable sort), ``[R, C]`` in
    ``dtype`` (int16 or int32; see :func:`rank_dtype`).

    Rank 0 is the least important entry; ties keep column order.
    """
    if importance.dim() != 2:
        raise ShapeError(f"importance must be [R, C], got shape {tuple(importance.shape)}")
    return row_ranks_by_chunks(
        lambda a, b: importance[a:b], importance.shape, importance.device, dtype
    )


def row_ranks_by_chunks(
    importance_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, ...],
    device: torch.device | str,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """:func:`row_ranks` of an importance matrix of ``shape`` given by row ranges:
    ``importance_rows(a, b)`` is its rows ``a:b``. Rows are sorted a chunk of about
    ``_RANK_CHUNK_ELEMS`` elements at a time, so besides the ranks themselves only one
    chunk's importance, sort values and int64 sort indices are held (not the whole layer's):
    each row's ranks are those of the whole-matrix sort."""
    if len(shape) != 2:
        raise ShapeError(f"importance must be [R, C], got shape {tuple(shape)}")
    if dtype not in (torch.int16, torch.int32):
        raise DtypeError(f"ranks must be int16 or int32, got {dtype}")
    rows, cols = shape
    if cols > torch.iinfo(dtype).max:
        raise ShapeError(f"importance has {cols} columns, more than {dtype} ranks can hold")
    ranks = torch.empty((rows, cols), dtype=dtype, device=device)
    step = max(1, _RANK_CHUNK_ELEMS // max(cols, 1))
    src = torch.arange(cols, dtype=dtype, device=device).expand(min(step, rows), cols)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        order = torch.sort(importance_rows(a, b), dim=1, stable=True).indices
        ranks[a:b].scatter_(1, order, src[: b - a])
    return ranks


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_candidates(candidates: torch.Tensor, d: int) -> None:
    if candidates.dim() != 1:
        raise ShapeError(f"candidates must be 1-D [D], got shape {tuple(candidates.shape)}")
    if candidates.shape[0] == 0:
        raise ShapeError("candidates is empty: at least one candidate sparsity is needed")
    if d >= 0 and candidates.shape[0] != d:
        raise ShapeError(f"candidates has {candidates.shape[0]} values but logits have D = {d}")
    if not candidates.is_floating_point():
        raise DtypeError(f"candidates must be floating point, got {candidates.dtype}")


def _check(
    weight: torch.Tensor | None, ranks: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor
) -> int:
    """Validate shapes/dtypes; returns rows per group ``k``."""
    if ranks.dim() != 2:
        raise ShapeError(f"ranks must be [R, C], got shape {tuple(ranks.shape)}")
    if ranks.dtype not in _RANK_DTYPES:
        raise DtypeError(f"ranks must be int16/int32/int64, got {ranks.dtype}")
    if weight is not None:
        if weight.shape != ranks.shape:
            raise ShapeError(
                f"weight shape {tuple(weight.shape)} != ranks shape {tuple(ranks.shape)}"
            )
        if weight.dtype not in _WEIGHT_DTYPES:
            raise DtypeError(f"weight must be fp16/bf16/fp32/fp64, got {weight.dtype}")
        if weight.device != ranks.device:
            raise ConfigError(f"weight on {weight.device} but ranks on {ranks.device}")
    if logits.dim() != 2:
        raise ShapeError(f"logits must be [G, D], got shape {tuple(logits.shape)}")
    if logits.device != ranks.device:
        raise ConfigError(f"logits on {logits.device} but ranks on {ranks.device}")
    _check_candidates(candidates, logits.shape[1])
    rows, cols = ranks.shape
    groups = logits.shape[0]
    if rows == 0 or cols == 0:
        raise ShapeError(f"empty weight of shape {tuple(ranks.shape)}")
    if groups == 0 or rows % groups != 0:
        raise ShapeError(
            f"logits have G = {groups} groups, which does not divide the R = {rows} rows"
        )
    return rows // groups


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------
def backend(device: torch.device | str | None = None) -> str:
    """Implementation used for tensors on ``device``: ``"cuda-ext"`` or ``"torch"``.

    ``device`` defaults to the current CUDA device when CUDA is available, else CPU. Setting
    ``BESA_STE_BACKEND=torch`` forces the fallback.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda" or os.environ.get("BESA_STE_BACKEND", "") == "torch":
        return "torch"
    return "cuda-ext" if _ext.load() is not None else "torch"


# --------------------------------------------------------------------------------------------
# the fused op
# --------------------------------------------------------------------------------------------
class _CandidateOrder(NamedTuple):
    """Per-(candidates, cols, device) constants: prune counts sorted by descending value, the
    sorting permutation, whether it is the identity, and the candidates on the device."""

    t_sorted: torch.Tensor
    order: torch.Tensor
    identity: bool
    on_device: dict[torch.dtype, torch.Tensor]


#: cache of :class:`_CandidateOrder` (BESA passes the same candidates tensor at every step and
#: layer: computing them each call costs a dozen small kernels and a host sync on a GPU)
_ORDER_CACHE: OrderedDict[tuple[Any, ...], tuple[Any, _CandidateOrder]] = OrderedDict()
_ORDER_CACHE_SIZE = 32


def _key_by_value(candidates: torch.Tensor) -> bool:
    """Whether the cache keys ``candidates`` by value (CPU) or by identity (a device); one
    function so that CPU-only tests can take the by-identity path."""
    return candidates.device.type == "cpu"


def _order_cache_key(candidates: torch.Tensor, cols: int, dev: torch.device) -> tuple | None:
    """Key of the candidates' constants: their values when they live on the CPU (reading them
    is free there), else the tensor's identity and version counter (any in-place change, e.g.
    ``copy_``, bumps the version; writes through ``.data`` are not seen). None: do not cache."""
    if _key_by_value(candidates):
        c = candidates.detach().contiguous()
        return ("values", c.dtype, tuple(c.shape), c.cpu().numpy().tobytes(), cols, dev)
    try:
        version = candidates._version
    except RuntimeError:  # inference tensors keep no version counter
        return None
    return (
        "tensor",
        id(candidates),
        version,
        candidates.data_ptr(),
        candidates.storage_offset(),
        tuple(candidates.shape),
        tuple(candidates.stride()),
        candidates.dtype,
        cols,
        dev,
    )


def _candidate_order(candidates: torch.Tensor, cols: int, dev: torch.device) -> _CandidateOrder:
    key = _order_cache_key(candidates, cols, dev)
    if key is not None:
        hit = _ORDER_CACHE.get(key)
        if hit is not None and (key[0] == "values" or hit[0]() is candidates):
            return hit[1]
    t = candidate_prune_counts(candidates.to(dev), cols)
    # sort candidates by descending prune count (a no-op for the usual descending p)
    order = torch.argsort(t, descending=True, stable=True)
    res = _CandidateOrder(t[order], order, bool(torch.all(t[1:] <= t[:-1])), {})
    if key is not None:
        _ORDER_CACHE[key] = (None if key[0] == "values" else weakref.ref(candidates), res)
        while len(_ORDER_CACHE) > _ORDER_CACHE_SIZE:
            _ORDER_CACHE.popitem(last=False)
    return res


class _Plan:
    """Per-call small tensors shared by forward and backward.

    ``n_rows`` (rows pruned per row) is int64 from the extension's kernel when ``use_ext``,
    else in the ranks' dtype (the fallback's form); the values are the same.
    """

    def __init__(
        self,
        ranks: torch.Tensor,
        logits: torch.Tensor,
        candidates: torch.Tensor,
        smoothing: bool,
        rows_per_group: int,
        use_ext: bool = False,
    ) -> None:
        rows, cols = ranks.shape
        dev = ranks.device
        w = candidate_weights(logits, smoothing)
        co = _candidate_order(candidates, cols, dev)
        self.t_sorted = co.t_sorted
        self.order = co.order
        self.identity_order = co.identity
        cand = co.on_device.get(w.dtype)
        if cand is None:
            cand = co.on_device.setdefault(w.dtype, candidates.detach().to(w.device, w.dtype))
        with torch.no_grad():
            alpha = _alpha(w, cand)
            if use_ext:
                ext = _ext.load()
                assert ext is not None
                self.n_rows = ext.prune_rows(alpha, rows, cols)
            else:
                n_group = prune_counts(alpha, cols)
                self.n_rows = n_group.repeat_interleave(rows_per_group).to(ranks.dtype)
        self.w: torch.Tensor | None = w
        self.rows_per_group = rows_per_group
        self._lut: torch.Tensor | None = None
        self.cols = cols

    def lut(self) -> torch.Tensor:
        """``m(k) = #{d : t_d > k}`` for every rank ``k`` (int64 ``[C]``)."""
        if self._lut is None:
            k = torch.arange(self.cols, device=self.t_sorted.device)
            t_asc = self.t_sorted.flip(0).contiguous()
            d = self.t_sorted.shape[0]
            self._lut = d - torch.searchsorted(t_asc, k, right=True)
        return self._lut


class _MaskFn(torch.autograd.Function):
    """``W * M`` (``soft=False``: M = hard, STE gradient) or ``W * P`` (``soft=True``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: torch.Tensor,
        w_sorted: torch.Tensor,
        ranks: torch.Tensor,
        n_rows: torch.Tensor,
        t_sorted: torch.Tensor,
        plan: _Plan,
        soft: bool,
        use_ext: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, w_sorted, ranks, n_rows, t_sorted)
        ctx.plan = plan
        ctx.soft = soft
        ctx.use_ext = use_ext
        if soft:
            return _fallback.soft_weight(weight, ranks, w_sorted, plan.lut(), plan.rows_per_group)
        if use_ext:
            return _ext.load().forward(weight, ranks, n_rows)  # type: ignore[union-attr]
        return _fallback.masked_weight(weight, ranks, n_rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        weight, w_sorted, ranks, n_rows, t_sorted = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_w, need_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        acc = w_sorted.dtype
        d = w_sorted.shape[1]
        grad_weight = grad_w = None
        if ctx.use_ext and need_logits:
            ext = _ext.load()
            assert ext is not None
            # soft mode returns fp32 for a half weight: the kernel wants one dtype
            w_in = weight if weight.dtype == grad.dtype else weight.to(grad.dtype)
            # bucket sums, group sums and the (negated) suffix sums over candidates
            grad_w, gw = ext.backward(
                grad,
                w_in,
                ranks,
                n_rows,
                t_sorted,
                plan.rows_per_group,
                bool(need_w and not ctx.soft),
                acc == torch.float64,
            )
            if need_w and not ctx.soft:
                grad_weight = gw
        elif need_logits:
            hist = _fallback.bucket_sums(grad, weight, ranks, plan.lut(), d + 1, acc)
            groups = ranks.shape[0] // plan.rows_per_group
            h = hist.view(groups, plan.rows_per_group, d + 1).sum(1)
            # dL/dw_d = -sum_{j > d} H[j] (no cumsum on CUDA: see _fallback, "Determinism")
            suffix = _fallback.suffix_sums(h)
            grad_w = (-suffix[:, 1:]).to(acc)
        if need_w and grad_weight is None:
            if ctx.soft:
                p = _fallback.soft_weight(None, ranks, w_sorted, plan.lut(), plan.rows_per_group)
                grad_weight = (grad.to(p.dtype) * p).to(weight.dtype)
            elif ctx.use_ext:
                grad_weight = _ext.load().forward(grad, ranks, n_rows)  # type: ignore[union-attr]
            else:
                grad_weight = _fallback.masked_grad(grad, ranks, n_rows)
        return grad_weight, grad_w, None, None, None, None, None, None


def _apply(
    weight: torch.Tensor,
    ranks: torch.Tensor,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    smoothing: bool,
    soft: bool,
) -> torch.Tensor:
    k = _check(weight, ranks, logits, candidates)
    weight = weight.contiguous()
    ranks = ranks.contiguous()
    use_ext = backend(ranks.device) == "cuda-ext"
    plan = _Plan(ranks, logits, candidates, smoothing, k, use_ext)
    assert plan.w is not None
    # candidates already sorted (the usual descending grid): no reordering, so the backward has
    # no index_add (non-deterministic on CUDA); otherwise the index is a permutation, whose
    # backward adds exactly one term to each zero and so has a unique result
    if plan.identity_order:
        w_sorted = plan.w
    else:
        w_sorted = plan.w.index_select(1, plan.order)
    plan.w = None  # ctx keeps the plan: hold no autograd-tracked tensor in it
    return _MaskFn.apply(weight, w_sorted, ranks, plan.n_rows, plan.t_sorted, plan, soft, use_ext)


def ste_mask(
    weight: torch.Tensor,
    ranks: torch.Tensor,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    smoothing: bool = True,
) -> torch.Tensor:
    """``W * M`` with M the hard mask in value and the soft mask in gradient.

    ``weight`` [R, C] (fp16/bf16/fp32/fp64), ``ranks`` [R, C] int16/int32/int64 from
    :func:`row_ranks`, ``logits`` [G, D] with ``G`` = R, R // k or 1, ``candidates`` [D]. The
    result has the weight's dtype; gradients flow to ``logits`` (accumulated in fp32) and, if it
    requires grad, to ``weight`` (``grad * hard``).
    """
    return _apply(weight, ranks, logits, candidates, smoothing, soft=False)


def soft_mask(
    ranks: torch.Tensor,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    smoothing: bool = True,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft keep-probabilities ``P`` (fp32 ``[R, C]``), or ``W * P`` when ``weight`` is given.

    Differentiable w.r.t. the logits through the same backward as :func:`ste_mask` (so
    ``gradcheck`` on it checks the straight-through gradient). Meant for tests and analysis; it
    materialises the full soft mask.
    """
    if weight is None:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        weight = torch.ones(ranks.shape, dtype=acc, device=ranks.device)
    return _apply(weight, ranks, logits, candidates, smoothing, soft=True)


def hard_mask(
    ranks: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, smoothing: bool = True
) -> torch.Tensor:
    """Boolean keep-mask ``[R, C]`` (True = kept), bit-identical to what :func:`ste_mask` uses."""
    k = _check(None, ranks, logits, candidates)
    with torch.no_grad():
        plan = _Plan(ranks, logits.detach(), candidates, smoothing, k)
        return _fallback.hard_mask(ranks, plan.n_rows)

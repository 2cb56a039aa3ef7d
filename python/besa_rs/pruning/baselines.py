"""One-shot layer-wise pruners, each uniform per layer: magnitude, Wanda and SparseGPT, in
unstructured and N:M form; plus :func:`refit_masked`, the least-squares refit of the kept
weights for a *given* mask that ``--reconstruct`` applies after any method (BESA and the
baselines alike: the control arms).

Masks are boolean with ``True`` = keep. Every function works on one weight matrix
``[rows, cols]`` (``nn.Linear.weight``: rows = output features, cols = input features).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, NumericalError, ShapeError
from .config import check_group

if TYPE_CHECKING:
    from .config import PruneConfig
    from .quant import ColumnQuantizer


def check_nm(name: str, cols: int, m: int) -> None:
    if m and cols % m:
        raise ShapeError(
            f"layer {name}: {cols} input features are not divisible by M={m} for N:M sparsity"
        )


#: elements per row chunk of a per-row mask selection: the chunk's score, sort values and int64
#: sort indices take 16 + 16 + 32 MiB whatever the size of the matrix (a whole-matrix argsort of
#: an 11008 x 4096 layer would take 0.72 GB)
SELECT_CHUNK_ELEMS = 1 << 22

#: rows ``a:b`` of a score matrix, computed on demand (float32 ``[b - a, cols]``)
RowScores = Callable[[int, int], torch.Tensor]


def row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """``(a, b)`` row ranges of about :data:`SELECT_CHUNK_ELEMS` elements covering ``rows``."""
    step = max(1, SELECT_CHUNK_ELEMS // max(cols, 1))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def _rows_of(score: torch.Tensor) -> RowScores:
    return lambda a, b: score[a:b]


def prune_lowest_per_row(
    score_rows: RowScores, shape: tuple[int, ...], device: torch.device, sparsity: float
) -> torch.Tensor:
    """Keep mask pruning the ``floor(sparsity * cols)`` lowest scores of every row, ties in
    column order (stable sort). The score is asked for and sorted a row chunk at a time: rows
    are independent, so the mask is the whole-matrix sort's, bit for bit."""
    rows, cols = shape
    k = int(sparsity * cols)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=device)
    if k > 0:
        for a, b in row_chunks(rows, cols):
            idx = torch.argsort(score_rows(a, b), dim=1, stable=True)[:, :k]
            mask[a:b].scatter_(1, idx, False)
    return mask


def keep_lowest_pruned_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row, prune exactly ``floor(sparsity * cols)`` lowest-score weights."""
    return prune_lowest_per_row(_rows_of(score), score.shape, score.device, sparsity)


def keep_lowest_pruned_global(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Over the whole matrix, prune exactly ``floor(sparsity * numel)`` lowest-score weights
    (ties: the first in row-major order, as a stable sort of the flattened matrix)."""
    if score.dtype == torch.float32 and score.numel() > SELECT_CHUNK_ELEMS:
        return prune_lowest_global(_rows_of(score), score.shape, score.device, sparsity)
    k = int(sparsity * score.numel())
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.argsort(score.flatten(), stable=True)[:k]
        mask[idx] = False
    return mask.view_as(score)


def sort_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in ``[0, 2^32)`` ordered as ``torch.sort`` orders the float32 values ``x``:
    by value, ``-0.0`` equal to ``+0.0``, every NaN after ``+inf`` and equal to the others."""
    x = x + 0.0  # -0.0 + 0.0 = +0.0; every other value unchanged
    bits = x.view(torch.int32)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the value
    keys.masked_fill_(torch.isnan(x), 0x7FFFFFFF)
    return keys.long() + 2**31


def prune_lowest_global(
    score_rows: RowScores, shape: tuple[int, ...], device: torch.device, sparsity: float
) -> torch.Tensor:
    """Keep mask pruning the ``floor(sparsity * numel)`` lowest scores of the whole float32
    matrix, ties in row-major order: the mask of a stable argsort of the flattened matrix, found
    without it. A radix select over the scores' order keys (:func:`sort_keys`), 16 bits at a
    time, finds the key ``t`` of the k-th lowest score; every score below ``t`` is pruned, and
    of those equal to ``t`` the first ones in row-major order. Three passes over row chunks:
    memory is the mask plus one chunk's keys, whatever the size of the matrix."""
    rows, cols = shape
    k = int(sparsity * rows * cols)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=device)
    if k == 0:
        return mask
    chunks = list(row_chunks(rows, cols))
    high = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for a, b in chunks:
        high += torch.bincount((sort_keys(score_rows(a, b)) >> 16).flatten(), minlength=1 << 16)
    cum = high.cumsum(0)
    h = int((cum < k).sum())  # the bin of the k-th lowest key
    below = int(cum[h - 1]) if h else 0
    low = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for a, b in chunks:
        keys = sort_keys(score_rows(a, b))
        low += torch.bincount(keys[(keys >> 16) == h] & 0xFFFF, minlength=1 << 16)
    cum = low.cumsum(0)
    lo = int((cum < k - below).sum())
    t = (h << 16) | lo
    need = k - below - (int(cum[lo - 1]) if lo else 0)  # keys equal to t that are pruned
    seen = 0
    for a, b in chunks:
        keys = sort_keys(score_rows(a, b))
        prune = keys < t
        eq = keys == t
        if seen < need:
            first = eq.flatten().cumsum(0).view_as(eq) <= need - seen
            prune |= eq & first
        seen += int(eq.sum())
        mask[a:b] = ~prune
    return mask


def prune_nm(
    score_rows: RowScores, shape: tuple[int, ...], device: torch.device, n: int, m: int
) -> torch.Tensor:
    """In every group of ``m`` consecutive input columns of a row, prune the ``n`` lowest
    (stable: ties in column order), a row chunk at a time."""
    rows, cols = shape
    mask = torch.ones(rows, cols, dtype=torch.bool, device=device)
    for a, b in row_chunks(rows, cols):
        g = score_rows(a, b).reshape(b - a, cols // m, m)
        idx = torch.argsort(g, dim=2, stable=True)[:, :, :n]
        mask[a:b].view(b - a, cols // m, m).scatter_(2, idx, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive input columns of a row, prune the ``n`` lowest."""
    return prune_nm(_rows_of(score), score.shape, score.device, n, m)


def keep_lowest_pruned(score: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    """Prunes the lowest-score ``sparsity`` of every output row (``group="row"``) or of the
    whole matrix (``group="layer"``)."""
    if check_group(group) == "row":
        return keep_lowest_pruned_per_row(score, sparsity)
    return keep_lowest_pruned_global(score, sparsity)


def _select(
    score_rows: RowScores,
    shape: tuple[int, ...],
    device: torch.device,
    sparsity: float,
    n: int,
    m: int,
    group: str,
) -> torch.Tensor:
    """The mask of the uniform baselines from a float32 score given by row chunks (N:M,
    per row, or over the whole layer), never holding more than a chunk of the score."""
    if m:
        return prune_nm(score_rows, shape, device, n, m)
    if check_group(group) == "row":
        return prune_lowest_per_row(score_rows, shape, device, sparsity)
    return prune_lowest_global(score_rows, shape, device, sparsity)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, n: int = 0, m: int = 0, group: str = "row"
) -> torch.Tensor:
    """Magnitude pruning: the smallest ``|W|`` of every row (default), of the whole matrix
    (``group="layer"``), or of every ``m`` consecutive inputs (N:M)."""
    w = weight.detach()
    return _select(lambda a, b: w[a:b].float().abs(), w.shape, w.device, sparsity, n, m, group)


def wanda_score(weight: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` (``col_sq_norm`` = sum of squared inputs per
    input feature)."""
    return weight.detach().float().abs() * col_sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor,
    col_sq_norm: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    group: str = "row",
) -> torch.Tensor:
    """Wanda's keep mask; the score ``|W| * ||X||`` is computed a row chunk at a time (it is
    elementwise: the same values as the whole matrix's)."""
    w = weight.detach()
    return _select(
        lambda a, b: wanda_score(w[a:b], col_sq_norm), w.shape, w.device, sparsity, n, m, group
    )


def _damped_hinv_chol(
    hessian: torch.Tensor, percdamp: float, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the inverse of the dampened Hessian; also the mask of dead
    input features (never active: zero diagonal)."""
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise NumericalError(
            f"layer {name}: Hessian is not positive definite after dampening ({e})"
        ) from None
    return U.float(), dead


def sparsegpt_diag_score(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01, name: str = ""
) -> torch.Tensor:
    """SparseGPT saliency ``W^2 / diag(chol(H^-1))^2`` (upper Cholesky factor of the inverse of
    the dampened Hessian), used as a BESA importance metric."""
    return sparsegpt_saliency(weight, sparsegpt_diag_sq(hessian, percdamp, name))


def sparsegpt_diag_sq(
    hessian: torch.Tensor, percdamp: float = 0.01, name: str = ""
) -> torch.Tensor:
    """``diag(chol(H^-1))^2`` per input feature, the denominator of :func:`sparsegpt_diag_score`."""
    U, _ = _damped_hinv_chol(hessian, percdamp, name)
    d = torch.diag(U)
    return d * d


def sparsegpt_saliency(weight: torch.Tensor, diag_sq: torch.Tensor) -> torch.Tensor:
    """``W^2 / diag_sq`` (elementwise: any row range of ``weight`` gives those rows' scores)."""
    return weight.detach().float() ** 2 / diag_sq.unsqueeze(0)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "",
    quantizer: ColumnQuantizer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune column block by column block (``blocksize`` columns) and compensate the
    error of each pruned weight on the not-yet-processed columns with the optimal brain surgeon
    update from the inverse Hessian ``H = 2/n sum x x^T`` (``percdamp`` * mean diagonal added).

    With ``mask`` given (``True`` = keep), the mask is not chosen but imposed: this is the
    least-squares reconstruction of the kept weights for an arbitrary (non-uniform) mask.
    Dead input features (zero Hessian diagonal: never active on the calibration data) are set
    to zero, as in the SparseGPT reference, and the returned mask counts them as pruned.
    Otherwise the mask is chosen per column block (unstructured: the lowest
    ``w^2 / [H^-1]_jj^2`` over the block, ``sparsity`` of it) or per ``m`` columns (N:M).

    With ``quantizer`` (:class:`besa_rs.pruning.quant.ColumnQuantizer`), SparseGPT's joint
    pass: each kept weight is replaced by its grid value and the quantization error is fed
    forward like a pruning error (GPTQ); see ``quant.sparsegpt_quant_prune``.

    Returns (new weight in the input's dtype, keep mask).
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ShapeError(
            f"layer {name}: Hessian shape {tuple(hessian.shape)} does not match {cols} input features"
        )
    if m and blocksize % m:
        raise ConfigError(f"SparseGPT block size {blocksize} is not a multiple of M={m}")
    W = weight.detach().float().clone()
    Hinv, dead = _damped_hinv_chol(hessian, percdamp, name)
    W[:, dead] = 0.0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if mask is not None:
            prune1 = ~mask[:, i1:i2].to(W.device)
        elif m == 0:
            score = W1 * W1 / (d1 * d1).unsqueeze(0)
            prune1 = ~keep_lowest_pruned_global(score, sparsity)
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = d1[i]
            if m and mask is None and i % m == 0:
                score = W1[:, i : i + m] ** 2 / (d1[i : i + m] ** 2).unsqueeze(0)
                idx = torch.argsort(score, dim=1, stable=True)[:, :n]
                prune1.scatter_(1, i + idx, True)
            q = torch.where(prune1[:, i], torch.zeros_like(w), w)
            if quantizer is not None:  # joint pass: the kept weights take their grid values
                q = quantizer.column(i1 + i, q, W, W1, Err1, Hinv, prune1, mask, i1)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {name}: SparseGPT update produced non-finite weights")
    # dead input features (zero Hessian diagonal) were zeroed above: they are pruned
    keep &= ~dead.to(keep.device).unsqueeze(0)
    W[~keep] = 0.0
    return W.to(weight.dtype), keep


@torch.no_grad()
def refine_masked_lstsq(
    weight: torch.Tensor,
    start: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    iters: int = 20,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Continues from ``start`` towards the exact least-squares optimum of every row's kept
    weights, ``min_V tr((V - W) H (V - W)^T)`` with ``V[~keep] = 0``, by ``iters`` steps of
    conjugate gradients run on all rows at once (each row is its own quadratic problem with its
    own step sizes; one ``[rows, cols] x [cols, cols]`` product per step). The objective never
    increases, so this only improves on the one-pass OBS update it starts from."""
    W = weight.detach().float()
    H = hessian.detach().float().clone()
    H += (
        percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    )
    k = keep.to(W.dtype)
    V = start.detach().float() * k
    r = ((W - V) @ H) * k
    p = r.clone()
    rr = (r * r).sum(1)
    eps = torch.finfo(torch.float32).tiny
    for _ in range(iters):
        Ap = (p @ H) * k
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > eps, rr / pAp.clamp_min(eps), torch.zeros_like(rr))
        V += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        rr_new = (r * r).sum(1)
        beta = torch.where(rr > eps, rr_new / rr.clamp_min(eps), torch.zeros_like(rr))
        p = r + beta.unsqueeze(1) * p
        rr = rr_new
    if not torch.isfinite(V).all():
        return start
    return (V * k).to(weight.dtype)


#: conjugate-gradient steps of the refit's least-squares refinement (``--reconstruct``)
REFIT_CG_STEPS = 20


def dead_columns(hessian: torch.Tensor) -> torch.Tensor:
    """Input features that were never active on the calibration data (``diag(H) == 0``)."""
    return torch.diag(hessian) == 0


@dataclass
class Refit:
    """Result of :func:`refit_masked` for one layer."""

    weight: torch.Tensor  #: refitted weight (the input's dtype), exactly zero outside ``keep``
    keep: torch.Tensor  #: final keep mask: the given mask less the dead input columns
    dead_columns: int  #: input features with zero Hessian diagonal
    dead_weights_zeroed: int  #: weights the given mask kept that the refit zeroed (dead columns)


@torch.no_grad()
def refit_masked(
    weight: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    cg_steps: int = REFIT_CG_STEPS,
    name: str = "",
) -> Refit:
    """The ``--reconstruct`` refit, the same for every method: the kept weights of the *dense*
    ``weight`` are refitted to the layer's calibration inputs (Hessian ``H = 2/n X^T X``) for the
    fixed mask ``keep`` (``True`` = keep), by the SparseGPT/OBS pass with the mask imposed
    (:func:`sparsegpt_prune` with ``mask``) followed by ``cg_steps`` conjugate-gradient steps
    towards the exact per-row least squares (:func:`refine_masked_lstsq`).

    ``weight`` must be the layer's original dense weight, whatever method chose the mask (for
    SparseGPT too: the refit starts again from the dense weight with SparseGPT's mask; its OBS
    pass then repeats SparseGPT's own update, and the CG steps continue from there). The mask is
    kept, except that weights in dead input columns (``diag(H) == 0``) are zeroed and counted as
    pruned: no calibration signal determines them.
    """
    keep = keep.to(weight.device)
    dead = dead_columns(hessian).to(weight.device)
    final = keep & ~dead.unsqueeze(0)
    start, _ = sparsegpt_prune(
        weight, hessian, mask=final, blocksize=blocksize, percdamp=percdamp, name=name
    )
    w = refine_masked_lstsq(weight, start, final, hessian, iters=cg_steps, percdamp=percdamp)
    return Refit(
        weight=w,
        keep=final,
        dead_columns=int(dead.sum()),
        dead_weights_zeroed=int((keep & dead.unsqueeze(0)).sum()),
    )


def refit_layer(
    weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, cfg: PruneConfig, name: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``reconstruct`` for one layer, whatever method chose ``keep``: refits the kept weights of
    the dense ``weight`` in place (:func:`refit_masked`). Returns the final keep mask (dead input
    columns zeroed, so counted as pruned) and the layer's report fields about dead columns."""
    fit = refit_masked(
        weight, keep, hessian, blocksize=cfg.blocksize, percdamp=cfg.percdamp, name=name
    )
    with torch.no_grad():
        weight.copy_(fit.weight)
    return fit.keep, {
        "dead_columns": fit.dead_columns,
        "dead_weights_zeroed": fit.dead_weights_zeroed,
    }

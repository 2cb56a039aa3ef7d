"""Straightforward reference of BESA's straight-through mask (the authors' formulation).

Materialises the candidate-to-rank map, the per-rank pruning probabilities (a matmul), scatters
them to columns with the sort indices and combines hard and soft masks with the STE trick. Only
``floor(p_d * C)`` is shared with the library (``candidate_prune_counts``), as the definition of
the candidates' prune counts.
"""

from __future__ import annotations

import torch

from besa_rs import ste
from besa_rs.ste import candidate_prune_counts


def make_case(rows, cols, groups, step, dtype, device, seed=0, ties=False, scale=3.0):
    """Seeded inputs of one mask-op case: ``(weight, importance, order, ranks, logits,
    candidates, upstream)``, with importance ties when ``ties`` (sorted stably on ``device``).
    The upstream gradient is representable in the weight dtype, so every implementation sees
    the same values."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        importance = torch.randint(0, 4, (rows, cols), generator=gen).float()
    else:
        importance = torch.rand(rows, cols, generator=gen)
    weight = torch.randn(rows, cols, generator=gen).to(dtype)
    cands = ste.candidate_sparsities(step)
    logits = (torch.randn(groups, cands.numel(), generator=gen) * scale).float()
    upstream = torch.randn(rows, cols, generator=gen).to(dtype)
    importance = importance.to(device)
    order = torch.sort(importance, dim=1, stable=True).indices
    ranks = ste.row_ranks(importance)
    to = {"device": device}
    return (
        weight.to(**to),
        importance,
        order,
        ranks,
        logits.to(**to),
        cands.to(**to),
        upstream.to(**to),
    )


def reference_masks(
    importance_order: torch.Tensor,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    smoothing: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(hard, soft, alpha)``: float hard mask, soft mask ``[R, C]`` and alpha ``[G]``.

    ``importance_order`` = sort indices of each row by ascending importance (stable).
    """
    rows, cols = importance_order.shape
    groups, _ = logits.shape
    k = rows // groups
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = torch.sigmoid(logits.to(acc)) if smoothing else logits.to(acc)
    w = torch.softmax(x, dim=-1)
    p = candidates.to(device=logits.device, dtype=acc)
    alpha = (w * p).sum(-1)
    n_prune = torch.floor(alpha.detach() * cols).clamp(0, cols).long()
    t = candidate_prune_counts(candidates, cols).to(logits.device)
    # candidate-to-rank map: 1 where candidate d prunes sorted position k
    cmap = (torch.arange(cols, device=logits.device)[None, :] < t[:, None]).to(acc)  # [D, C]
    prune_prob = w @ cmap  # [G, C], by sorted position
    keep_prob = (1.0 - prune_prob).repeat_interleave(k, dim=0)  # [R, C]
    soft = torch.zeros(rows, cols, dtype=acc, device=logits.device).scatter(
        1, importance_order, keep_prob
    )
    n_rows = n_prune.repeat_interleave(k)
    pruned_pos = torch.arange(cols, device=logits.device)[None, :] < n_rows[:, None]
    hard = torch.zeros(rows, cols, dtype=acc, device=logits.device).scatter(
        1, importance_order, (~pruned_pos).to(acc)
    )
    return hard, soft, alpha


def reference_ste(
    weight: torch.Tensor,
    importance_order: torch.Tensor,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    smoothing: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W * M, hard, soft)`` with ``M = hard - soft.detach() + soft``."""
    hard, soft, _ = reference_masks(importance_order, logits, candidates, smoothing)
    mask = hard - soft.detach() + soft
    return weight * mask, hard, soft


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / (|e| + max|e|)``: relative to each value, floored at the tensor's scale.

    Gradients of the logits are sums of many signed terms, so an entry near zero can only be
    compared relative to the scale of the whole gradient.
    """
    a = actual.detach().double()
    e = expected.detach().double()
    scale = e.abs().max().clamp_min(1e-30)
    return float(((a - e).abs() / (e.abs() + scale)).max())


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    err = relative_error(actual, expected)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"

"""BESA for one transformer block (spec/besa.md, steps 1-11).

Weights stay frozen; per linear layer we learn logits over candidate sparsities (one vector per
output row, per group of K rows, or per layer). The block's forward uses ``W * M`` with ``M``
the straight-through mask of :mod:`besa_rs.ste`; the loss is the per-channel relative
reconstruction error of the block's output plus ``lambda`` times the squared relative deviation
of the block's expected sparsity from the target.

After optimisation the learned per-row rates are shifted by one common offset (found by
bisection) so that the block's realised sparsity equals the target (see docs/pruning.md,
"Exact sparsity"); then the hard masks are multiplied into the weights and, with
``reconstruct``, the kept weights of each layer are refitted to the layer's calibration inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import ste
from ..errors import NumericalError, ShapeError
from . import quant
from .baselines import refine_masked_lstsq, sparsegpt_diag_score, sparsegpt_prune, wanda_score
from .sequential import BlockContext

#: conjugate-gradient steps of the reconstruction's least-squares refinement
RECONSTRUCT_CG_STEPS = 20


def importance(
    metric: str, weight: torch.Tensor, stats: Any, percdamp: float, name: str
) -> torch.Tensor:
    if metric == "wanda":
        return wanda_score(weight, stats.sq_norm)
    if metric == "magnitude":
        return weight.detach().float().abs()
    return sparsegpt_diag_score(weight, stats.hessian, percdamp, name)


def groups_for(kind: str, k: int, rows: int, name: str) -> int:
    if kind == "row":
        return rows
    if kind == "layer":
        return 1
    if rows % k:
        raise ShapeError(
            f"layer {name}: row-block size K={k} does not divide its {rows} output rows"
        )
    return rows // k


def make_optimizer(params: list[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.learning_rate, d_coef=cfg.d_coef, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)


def relative_reconstruction(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """``mean_h sum_t ((Y - Y_hat)_th / n_h)^2`` with ``n_h`` = L2 norm of target channel h over
    the batch's tokens."""
    y = y.float().reshape(-1, y.shape[-1])
    d = y - y_hat.float().reshape(-1, y.shape[-1])
    n2 = (y * y).sum(0).clamp_min(1e-12)
    return ((d * d).sum(0) / n2).mean()


def corrected_prune_counts(
    rates: list[torch.Tensor], cols: list[int], target_zeros: int
) -> tuple[list[torch.Tensor], float]:
    """Per-row prune counts ``floor(clamp(rate_r + t, 0, 1) * C)`` with one common offset ``t``
    chosen by bisection so that the total is the smallest count >= ``target_zeros`` (exact up to
    the rows that share a rate). Returns the counts and ``t``."""

    def counts(t: float) -> list[torch.Tensor]:
        return [
            torch.floor((r.double() + t).clamp(0.0, 1.0) * c).to(torch.int64)
            for r, c in zip(rates, cols, strict=True)
        ]

    def total(t: float) -> int:
        return int(sum(int(x.sum()) for x in counts(t)))

    lo, hi = -1.0, 1.0
    if total(0.0) == target_zeros:
        return counts(0.0), 0.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if total(mid) >= target_zeros:
            hi = mid
        else:
            lo = mid
    # hi: smallest offset reaching the target; lo: largest below it; take the closer total
    t = hi if abs(total(hi) - target_zeros) <= abs(total(lo) - target_zeros) else lo
    return counts(t), t


def prune_block_besa(ctx: BlockContext) -> dict[str, Any]:
    cfg = ctx.cfg
    if cfg.wbits is not None and cfg.sparsity == 0:  # learned clipping alone (quant.py)
        return quant.prune_block_clip_only(ctx)
    kind, k = cfg.granularity_rows()
    dev = ctx.device
    names = list(ctx.linears)
    need_norms = cfg.metric == "wanda"
    need_h = cfg.metric == "sparsegpt" or cfg.reconstruct

    # --- 1-3: dense target and importance statistics on the pruned-chain inputs
    if cfg.prune_dense and ctx.xd is not None:
        stats, _ = ctx.run_with_stats(ctx.xs, need_norms, need_h, keep_outputs=False)
        targets = ctx.run_all(ctx.xd)
        ctx.next_xd = targets
    else:
        stats, targets = ctx.run_with_stats(ctx.xs, need_norms, need_h, keep_outputs=True)

    # --- 4-6: ranks, candidates, logits
    cand = ste.candidate_sparsities(cfg.candidate_step).to(dev)
    D = cand.shape[0]
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, torch.Tensor] = {}
    logits: dict[str, torch.Tensor] = {}
    rows_per_group: dict[str, int] = {}
    for name in names:
        W = ctx.linears[name].weight.detach()
        full = f"block {ctx.index} {name}"
        imp = importance(cfg.metric, W, stats.get(name), cfg.percdamp, full)
        ranks[name] = ste.row_ranks(imp.to(dev))
        del imp
        G = groups_for(kind, k, W.shape[0], full)
        rows_per_group[name] = W.shape[0] // G
        weights[name] = W
        logits[name] = torch.zeros(G, D, dtype=torch.float32, device=dev, requires_grad=True)
    params_per_group = {n: rows_per_group[n] * weights[n].shape[1] for n in names}
    clip = quant.BlockClip.create(cfg, weights, dev, ctx.index)  # None without wbits
    total_params = sum(weights[n].numel() for n in names)
    target = float(cfg.sparsity)

    def block_sparsity() -> torch.Tensor:
        s = torch.zeros((), dtype=torch.float32, device=dev)
        for n in names:
            a = ste.expected_sparsity(logits[n], cand, cfg.smoothing)
            s = s + a.sum() * params_per_group[n]
        return s / total_params

    # --- 7-10: optimisation
    requires = {p: p.requires_grad for p in ctx.block.parameters()}
    for p in ctx.block.parameters():
        p.requires_grad_(False)
    opt = make_optimizer([logits[n] for n in names], cfg)
    if clip is not None:
        clip.add_param_group(opt, cfg)
    losses: list[float] = []
    recs: list[float] = []
    sparsities: list[float] = []
    nsamples = len(ctx.xs)
    try:
        step = 0
        for _epoch in range(cfg.epochs):
            for s0 in range(0, nsamples, cfg.batch_size):
                sl = slice(s0, s0 + cfg.batch_size)
                x = ctx.batch(ctx.xs, sl)
                y = torch.cat(targets[sl], dim=0).to(dev)
                masked = {
                    f"{n}.weight": ste.ste_mask(
                        weights[n], ranks[n], logits[n], cand, cfg.smoothing
                    )
                    for n in names
                }
                if clip is not None:  # joint: the forward uses quantize(W * M), STE rounding
                    masked = clip.fake_quant(masked)
                with ctx.autocast():
                    out = functional_call(ctx.block, masked, (x, *ctx.args), ctx.kwargs)
                y_hat = out[0] if isinstance(out, (tuple, list)) else out
                rec = relative_reconstruction(y, y_hat)
                s = block_sparsity()
                loss = rec + cfg.lam * ((s - target) / target) ** 2
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NumericalError(
                        f"block {ctx.index}: the BESA loss became {lv} at step {step} "
                        f"(reconstruction {float(rec.detach())}); try a smaller learning rate or float32"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(lv)
                recs.append(float(rec.detach()))
                sparsities.append(float(s.detach()))
                step += 1
                if ctx.progress is not None:
                    ctx.progress.update(1)
                    ctx.progress.set_postfix(
                        loss=f"{lv:.4g}", s=f"{float(s.detach()):.3f}", refresh=False
                    )
                del masked, out, y_hat, loss, rec, x, y
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
    del opt, targets

    # --- 11: hard masks with exact block sparsity, weights updated in place
    with torch.no_grad():
        alphas = {n: ste.expected_sparsity(logits[n].detach(), cand, cfg.smoothing) for n in names}
        hard_before = {
            n: ste.hard_mask(ranks[n], logits[n].detach(), cand, cfg.smoothing) for n in names
        }
        rates = [alphas[n].repeat_interleave(rows_per_group[n]) for n in names]
        cols = [weights[n].shape[1] for n in names]
        target_zeros = round(target * total_params)
        counts, shift = corrected_prune_counts(rates, cols, target_zeros)
        layers = []
        for n, cnt in zip(names, counts, strict=True):
            lin: nn.Linear = ctx.linears[n]
            keep = ranks[n] >= cnt.to(dev).unsqueeze(1)
            W = lin.weight
            if cfg.reconstruct:
                H = stats[n].hessian
                name = f"block {ctx.index} {n}"
                Wr, _ = sparsegpt_prune(
                    W, H, mask=keep, blocksize=cfg.blocksize, percdamp=cfg.percdamp, name=name
                )
                Wr = refine_masked_lstsq(
                    W, Wr, keep, H, iters=RECONSTRUCT_CG_STEPS, percdamp=cfg.percdamp
                )
                W.copy_(Wr)
            else:
                W.mul_(keep.to(W.dtype))
            qinfo = {}
            if clip is not None:  # learned clipping; with reconstruct the GPTQ pass (quant.py)
                H = stats[n].hessian if cfg.reconstruct else None
                qinfo = clip.finish(n, lin, keep, H, cfg, ctx.index)
            a = alphas[n]
            row_rates = 1.0 - keep.float().mean(1)
            layers.append(
                {
                    "name": n,
                    "shape": list(W.shape),
                    "params": W.numel(),
                    "groups": int(a.shape[0]),
                    "target_sparsity": target,
                    "learned_sparsity": float(a.mean()),  # expected alpha (equal-size groups)
                    "hard_sparsity_learned": 1.0 - float(hard_before[n].float().mean()),
                    "realised_sparsity": 1.0 - float(keep.float().mean()),
                    "row_sparsity_min": float(row_rates.min()),
                    "row_sparsity_max": float(row_rates.max()),
                    "row_sparsity_std": float(row_rates.std()) if row_rates.numel() > 1 else 0.0,
                    **qinfo,
                }
            )
        expected = sum(float(alphas[n].sum()) * params_per_group[n] for n in names) / total_params
        hard = (
            sum((1.0 - float(hard_before[n].float().mean())) * weights[n].numel() for n in names)
            / total_params
        )
    del stats
    return {
        "layers": layers,
        "expected_sparsity": expected,
        "hard_sparsity_learned": hard,
        "sparsity_shift": shift,
        "loss": losses,
        "reconstruction": recs,
        "sparsity_curve": sparsities,
    }

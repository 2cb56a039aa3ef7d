"""The uniform baselines as block methods: magnitude, Wanda and SparseGPT prune every linear
layer of a block to the same sparsity (unstructured or N:M) with the layer-wise pruners of
:mod:`besa_rs.pruning.baselines`; with ``reconstruct`` the kept weights are then refitted (the
control arms), with ``wbits`` the weights are quantized (:mod:`besa_rs.pruning.quant`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import quant
from .baselines import (
    check_nm,
    dead_columns,
    magnitude_mask,
    refit_layer,
    sparsegpt_prune,
    wanda_mask,
)
from .config import PruneConfig, parse_structure
from .context import BlockContext
from .registry import Method, register

#: chooses one layer's mask: (weight, its statistics, cfg, n, m, layer name, GPTQ quantizer) ->
#: (new weight or None to multiply the mask in, keep mask, extra report fields)
Choice = tuple[torch.Tensor | None, torch.Tensor, dict[str, Any]]
Chooser = Callable[[torch.Tensor, Any, PruneConfig, int, int, str, Any], Choice]


def _magnitude(
    W: torch.Tensor, st: Any, cfg: PruneConfig, n: int, m: int, name: str, gptq: Any
) -> Choice:
    return None, magnitude_mask(W, cfg.sparsity, n, m, cfg.group), {}


def _wanda(
    W: torch.Tensor, st: Any, cfg: PruneConfig, n: int, m: int, name: str, gptq: Any
) -> Choice:
    return None, wanda_mask(W, st.sq_norm, cfg.sparsity, n, m, cfg.group), {}


def _sparsegpt(
    W: torch.Tensor, st: Any, cfg: PruneConfig, n: int, m: int, name: str, gptq: Any
) -> Choice:
    new_w, keep = sparsegpt_prune(
        W,
        st.hessian,
        cfg.sparsity,
        n,
        m,
        blocksize=cfg.blocksize,
        percdamp=cfg.percdamp,
        name=name,
        quantizer=gptq,  # None without wbits; else SparseGPT's joint pass
    )
    # SparseGPT zeroes dead input columns itself (its mask counts them as pruned)
    return new_w, keep, {"dead_columns": int(dead_columns(st.hessian).sum())}


def layer_info(
    name: str, lin: nn.Linear, target: float, keep: torch.Tensor, **extra: Any
) -> dict[str, Any]:
    realised = 1.0 - keep.float().mean().item()
    return {
        "name": name,
        "shape": list(lin.weight.shape),
        "params": lin.weight.numel(),
        "target_sparsity": target,
        "realised_sparsity": realised,
        **extra,
    }


def uniform_method(
    name: str, choose: Chooser, norms: bool = False, hessian: bool = False
) -> Callable[[BlockContext], dict[str, Any]]:
    """The block method of a uniform baseline whose layer masks ``choose`` picks from the
    layers' input statistics (``norms``: squared column norms; ``hessian``: ``X^T X``)."""

    def prune_block(ctx: BlockContext) -> dict[str, Any]:
        cfg = ctx.cfg
        n, m = parse_structure(cfg.structure)
        for lname, lin in ctx.linears.items():
            check_nm(f"block {ctx.index} {lname}", lin.in_features, m)
        need_h = hessian or cfg.reconstruct
        stats: dict[str, Any] = {}
        if norms or need_h:
            stats, _ = ctx.run_with_stats(ctx.xs, norms, need_h, keep_outputs=False)
        layers = []
        for lname, lin in ctx.linears.items():
            W = lin.weight.data
            full = f"block {ctx.index} {lname}"
            # SparseGPT's joint pass quantizes inside the OBS pass; the others use RTN after
            gptq = quant.column_quantizer(cfg, W, full) if hessian else None
            new_w, keep, extra = choose(W, stats.get(lname), cfg, n, m, full, gptq)
            H = None
            if cfg.reconstruct:
                # the control arm: this method's mask, then BESA's refit from the dense weight;
                # with wbits the refitted weights then go through the GPTQ pass with that mask
                H = stats[lname].hessian
                keep, extra = refit_layer(W, keep, H, cfg, full)
                gptq = None  # the joint pass chose the mask; its weights are not kept
            elif new_w is not None:
                W.copy_(new_w)
            else:
                W.mul_(keep.to(W.dtype))
            layers.append(layer_info(lname, lin, cfg.sparsity, keep, **extra))
            # RTN / the joint pass's grid / GPTQ with the mask after a refit; no-op without wbits
            quant.finish_layer(cfg, lin, keep, layers[-1], full, gptq, hessian=H)
            if ctx.progress is not None:
                ctx.progress.update(1)
        del stats
        return {"layers": layers}

    prune_block.__name__ = f"prune_block_{name}"
    return prune_block


register(
    Method(
        "magnitude",
        uniform_method("magnitude", _magnitude),
        # magnitude reads only the weights, unless reconstruct refits them to the inputs
        reads_inputs=lambda cfg: cfg.reconstruct,
        structured=True,
    )
)
register(Method("wanda", uniform_method("wanda", _wanda, norms=True), structured=True))
register(
    Method("sparsegpt", uniform_method("sparsegpt", _sparsegpt, hessian=True), structured=True)
)

"""Sequential block-by-block pruning: the model stays where it is (CPU); one block at a time
goes to the compute device, is pruned by a method on the calibration activations produced by
the already pruned blocks before it, and its pruned outputs become the next block's inputs."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from . import quant
from .adapters import (
    ModelAdapter,
    block_linears,
    block_output,
    capture_block_inputs,
    get_adapter,
    to_device,
)
from .baselines import (
    check_nm,
    dead_columns,
    magnitude_mask,
    parse_structure,
    refit_masked,
    sparsegpt_prune,
    wanda_mask,
)
from .config import PruneConfig
from .stats import gather_stats

_TEST_DELAY = os.environ.get("BESA_RS_TEST_BLOCK_DELAY")


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
    extra: dict[str, Any] = field(default_factory=dict)

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


def refit_layer(
    weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, cfg: PruneConfig, name: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``--reconstruct`` for one layer, whatever method chose ``keep``: refits the kept weights of
    the dense ``weight`` in place (:func:`besa_rs.pruning.baselines.refit_masked`). Returns the
    final keep mask (dead input columns zeroed, so counted as pruned) and the layer's report
    fields about dead columns."""
    fit = refit_masked(
        weight, keep, hessian, blocksize=cfg.blocksize, percdamp=cfg.percdamp, name=name
    )
    with torch.no_grad():
        weight.copy_(fit.weight)
    return fit.keep, {
        "dead_columns": fit.dead_columns,
        "dead_weights_zeroed": fit.dead_weights_zeroed,
    }


def block_summary(layers: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(li["params"] for li in layers)
    zeros = sum(li["realised_sparsity"] * li["params"] for li in layers)
    return {
        "params": total,
        "realised_sparsity": zeros / total if total else 0.0,
        "dead_columns": sum(li.get("dead_columns") or 0 for li in layers),
        "dead_weights_zeroed": sum(li.get("dead_weights_zeroed") or 0 for li in layers),
    }


# ---------------------------------------------------------------------------------------------
# baselines as block methods


def prune_block_baseline(ctx: BlockContext) -> dict[str, Any]:
    cfg = ctx.cfg
    n, m = parse_structure(cfg.structure)
    for name, lin in ctx.linears.items():
        check_nm(f"block {ctx.index} {name}", lin.in_features, m)
    need_norms = cfg.method == "wanda"
    need_h = cfg.method == "sparsegpt" or cfg.reconstruct
    stats: dict[str, Any] = {}
    if need_norms or need_h:
        stats, _ = ctx.run_with_stats(ctx.xs, need_norms, need_h, keep_outputs=False)
    layers = []
    for name, lin in ctx.linears.items():
        W = lin.weight.data
        full = f"block {ctx.index} {name}"
        gptq = quant.column_quantizer(cfg, W, full) if cfg.method == "sparsegpt" else None
        extra: dict[str, Any] = {}
        new_w = None
        if cfg.method == "magnitude":
            keep = magnitude_mask(W, cfg.sparsity, n, m, cfg.group)
        elif cfg.method == "wanda":
            keep = wanda_mask(W, stats[name].sq_norm, cfg.sparsity, n, m, cfg.group)
        elif cfg.method == "sparsegpt":
            new_w, keep = sparsegpt_prune(
                W,
                stats[name].hessian,
                cfg.sparsity,
                n,
                m,
                blocksize=cfg.blocksize,
                percdamp=cfg.percdamp,
                name=full,
                quantizer=gptq,  # None without wbits; else SparseGPT's joint pass
            )
            # SparseGPT zeroes dead input columns itself (its mask counts them as pruned)
            extra["dead_columns"] = int(dead_columns(stats[name].hessian).sum())
        else:  # pragma: no cover - validated before
            raise ConfigError(f"unknown method {cfg.method!r}")
        hessian = None
        if cfg.reconstruct:
            # the control arm: this method's mask, then BESA's refit from the dense weight;
            # with wbits the refitted weights then go through the GPTQ pass with that mask
            hessian = stats[name].hessian
            keep, extra = refit_layer(W, keep, hessian, cfg, full)
            gptq = None  # the joint pass chose the mask; its weights are not kept
        elif new_w is not None:
            W.copy_(new_w)
        else:
            W.mul_(keep.to(W.dtype))
        layers.append(layer_info(name, lin, cfg.sparsity, keep, **extra))
        # RTN / the joint pass's grid / GPTQ with the mask after a refit; a no-op without wbits
        quant.finish_layer(cfg, lin, keep, layers[-1], full, gptq, hessian=hessian)
        if ctx.progress is not None:
            ctx.progress.update(1)
    del stats
    return {"layers": layers}


BlockMethod = Callable[[BlockContext], dict[str, Any]]


def block_method(cfg: PruneConfig) -> BlockMethod:
    if cfg.method == "besa":
        from .besa import prune_block_besa

        return prune_block_besa
    return prune_block_baseline


# ---------------------------------------------------------------------------------------------
# the driver


@dataclass
class RunState:
    """Progress of a run: what a checkpoint holds."""

    next_block: int
    xs: list[torch.Tensor]
    xd: list[torch.Tensor] | None
    blocks: list[dict[str, Any]]


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_tokens(tokens: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise DataError(
            f"calibration tokens must be a [nsamples, seqlen] tensor with nsamples >= 1 and seqlen >= 2, got shape {tuple(tokens.shape)}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise DataError(f"calibration tokens must be integer token ids, got dtype {tokens.dtype}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise DataError(f"calibration token ids must be in [0, {vocab}) for this model")
    return tokens.long()


def run_pruning(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: PruneConfig,
    checkpoint: Any = None,
    stream: Any = None,
) -> dict[str, Any]:
    """Prunes ``model`` in place; returns the run report (per block: layers, times, losses).

    ``checkpoint`` (a :class:`besa_rs.pruning.checkpoint.Checkpointer`) saves progress after
    every block and, when it holds a previous run's progress, the run continues from there.
    ``stream`` (a :class:`besa_rs.pruning.streaming.StreamedModel` whose skeleton is ``model``)
    loads each block when its turn comes and writes it to the output files when done."""
    cfg.validate()
    adapter = get_adapter(model)
    tokens = _check_tokens(tokens, model)
    n_blocks = len(adapter)
    first = cfg.first_block
    last = n_blocks if cfg.num_blocks is None else min(n_blocks, first + cfg.num_blocks)
    if first >= n_blocks:
        raise ConfigError(f"first_block {first} is out of range: the model has {n_blocks} blocks")
    quant.check_groups(adapter, first, last, quant.spec_of(cfg))  # fail before any block
    device = torch.device(cfg.device)
    cache_device = torch.device(cfg.cache_device) if cfg.cache_device else device
    model_dtype = _model_dtype(model)
    cache_dtype = cfg.torch_cache_dtype(model_dtype)
    was_training = model.training
    model.eval()
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    state: RunState | None = checkpoint.load(adapter) if checkpoint is not None else None
    if stream is not None:
        workdir = checkpoint.dir if checkpoint is not None else stream.workdir
        stream.begin(workdir, cfg, first, last, resumed=state is not None)
    captured = capture_block_inputs(
        adapter, tokens, cache_device=cache_device, cache_dtype=cache_dtype
    )
    # magnitude pruning reads only the weights: no block has to run on calibration data
    # (unless --reconstruct refits them to the calibration inputs)
    needs_inputs = cfg.method != "magnitude" or cfg.reconstruct
    if state is None:
        xs = captured.hidden if needs_inputs else []
        # blocks before first_block are kept dense; their outputs feed first_block
        xd = None
        if first > 0 and needs_inputs:
            xs = _run_dense_chain(
                adapter, captured, 0, first, device, cache_device, cache_dtype, model_dtype, stream
            )
        if cfg.prune_dense and cfg.method == "besa":
            xd = [x.clone() for x in xs]
        state = RunState(next_block=first, xs=xs, xd=xd, blocks=[])
    captured.hidden = []  # the state owns the activations now

    method = block_method(cfg)
    progress = _progress(cfg, adapter, state.next_block, last, int(tokens.shape[0]))
    try:
        for i in range(state.next_block, last):
            t0 = time.perf_counter()
            if stream is not None:
                stream.load_block(i)
            block = adapter.blocks[i]
            home = next(block.parameters()).device
            block.to(device)
            args, kwargs = captured.block_args[i]
            ctx = BlockContext(
                index=i,
                block=block,
                linears=block_linears(block),
                args=to_device(args, device),
                kwargs=to_device(kwargs, device),
                device=device,
                xs=state.xs,
                xd=state.xd,
                cfg=cfg,
                cache_device=cache_device,
                cache_dtype=cache_dtype,
                compute_dtype=model_dtype,
                progress=progress,
                previous=state.blocks[-1] if state.blocks else None,
            )
            if progress is not None:
                progress.set_description(f"block {i}/{last - 1} ({cfg.method})")
            info = method(ctx)
            # the pruned block's outputs feed the next block
            if needs_inputs:
                state.xs = ctx.run_all(state.xs)
            if state.xd is not None:
                state.xd = ctx.next_xd
            block.to(home)
            info = {
                "index": i,
                **info,
                **block_summary(info["layers"]),
                "seconds": time.perf_counter() - t0,
            }
            state.blocks.append(info)
            state.next_block = i + 1
            if stream is not None:
                stream.finish_block(i)  # written and durable before the checkpoint says so
            if checkpoint is not None:
                checkpoint.save(adapter, state, last)
                if _TEST_DELAY:  # lets the resume test kill a run between/inside blocks
                    time.sleep(float(_TEST_DELAY))
    finally:
        if progress is not None:
            progress.close()
        if was_training:
            model.train()

    return build_report(adapter, cfg, tokens, state.blocks, time.perf_counter() - t_start)


@torch.no_grad()
def _run_dense_chain(
    adapter: ModelAdapter,
    captured: Any,
    start: int,
    stop: int,
    device: torch.device,
    cache_device: torch.device,
    cache_dtype: torch.dtype,
    model_dtype: torch.dtype,
    stream: Any = None,
) -> list[torch.Tensor]:
    xs = captured.hidden
    for i in range(start, stop):
        if stream is not None:
            stream.load_block(i)
        block = adapter.blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        args, kwargs = captured.block_args[i]
        args, kwargs = to_device(args, device), to_device(kwargs, device)
        xs = [
            block_output(block(x.to(device=device, dtype=model_dtype), *args, **kwargs)).to(
                cache_device, cache_dtype
            )
            for x in xs
        ]
        block.to(home)
        if stream is not None:
            stream.release_block(i)
    return xs


def _progress(cfg: PruneConfig, adapter: ModelAdapter, start: int, last: int, nsamples: int) -> Any:
    """One bar over the whole run: optimisation steps for BESA, layers for the baselines."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    if cfg.method == "besa":
        steps = cfg.epochs * -(-nsamples // cfg.batch_size)
        return tqdm(total=(last - start) * steps, unit="step", leave=False)
    total = sum(len(adapter.linears(i)) for i in range(start, last))
    return tqdm(total=total, unit="layer", leave=False)


def build_report(
    adapter: ModelAdapter,
    cfg: PruneConfig,
    tokens: torch.Tensor,
    blocks: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    total = sum(b["params"] for b in blocks)
    zeros = sum(b["realised_sparsity"] * b["params"] for b in blocks)
    report: dict[str, Any] = {
        "model_type": adapter.model_type,
        "blocks_path": adapter.blocks_path,
        "num_blocks": len(adapter),
        "settings": cfg.to_dict(),
        "calibration": {"nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1])},
        "blocks": blocks,
        "totals": {
            "pruned_blocks": len(blocks),
            "linear_params": total,
            "realised_sparsity": zeros / total if total else 0.0,
            # input columns without calibration signal; zeroed (counted in the realised
            # sparsity) by SparseGPT and by the --reconstruct refit
            "dead_columns": sum(b.get("dead_columns", 0) for b in blocks),
            "dead_weights_zeroed": sum(b.get("dead_weights_zeroed", 0) for b in blocks),
            "seconds": seconds,
        },
    }
    return report

"""Sequential block-by-block pruning: the model stays where it is (CPU); one block at a time
goes to the compute device, is pruned by a method on the calibration activations produced by
the already pruned blocks before it, and its pruned outputs become the next block's inputs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from . import distributed
from .adapters import (
    ModelAdapter,
    block_linears,
    block_output,
    capture_block_inputs,
    get_adapter,
    to_device,
)
from .config import PruneConfig, spec_of
from .context import BlockContext
from .registry import Method, method_for


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
    method = method_for(cfg)
    _check_groups(adapter, first, last, cfg)  # fail before any block
    device = torch.device(cfg.device)
    cache_device = torch.device(cfg.cache_device) if cfg.cache_device else device
    model_dtype = _model_dtype(model)
    cache_dtype = cfg.torch_cache_dtype(model_dtype)
    was_training = model.training
    model.eval()
    shard = distributed.setup(cfg, tokens, model, stream)  # None outside a process group
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    state: RunState | None = checkpoint.load(adapter) if checkpoint is not None else None
    if stream is not None:
        workdir = checkpoint.dir if checkpoint is not None else stream.workdir
        stream.begin(workdir, cfg, first, last, resumed=state is not None)
    captured = capture_block_inputs(
        adapter,
        tokens if shard is None else tokens[shard.indices],  # this rank's samples only
        cache_device=cache_device,
        cache_dtype=cache_dtype,
    )
    if stream is not None:
        stream.release_outer()  # the embeddings have done their part
    # a method that reads only the weights (magnitude) needs no block run on calibration data
    needs_inputs = method.reads_inputs(cfg)
    if state is None:
        xs = captured.hidden if needs_inputs else []
        # blocks before first_block are kept dense; their outputs feed first_block
        xd = None
        if first > 0 and needs_inputs:
            xs = _run_dense_chain(
                adapter, captured, 0, first, device, cache_device, cache_dtype, model_dtype, stream
            )
        if cfg.prune_dense and method.dense_chain:
            xd = [x.clone() for x in xs]
        state = RunState(next_block=first, xs=xs, xd=xd, blocks=[])
    captured.hidden = []  # the state owns the activations now

    progress = (
        _progress(cfg, method, adapter, state.next_block, last, int(tokens.shape[0]))
        if distributed.is_main()  # one bar, rank 0's
        else None
    )
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
                shard=shard,
            )
            if progress is not None:
                progress.set_description(f"block {i}/{last - 1} ({cfg.method})")
            info = method.prune_block(ctx)
            distributed.sync_block(ctx.linears, i)  # rank 0's weights everywhere
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
            if shard is not None:
                info["communication"] = distributed.TRAFFIC.take()
            state.blocks.append(info)
            state.next_block = i + 1
            if stream is not None:
                stream.finish_block(i)  # written and durable before the checkpoint says so
            if checkpoint is not None:
                checkpoint.save(adapter, state, last)
    finally:
        if progress is not None:
            progress.close()
        if was_training:
            model.train()

    report = build_report(adapter, cfg, tokens, state.blocks, time.perf_counter() - t_start)
    if shard is not None:
        report["distributed"] = shard.describe()
    return report


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


def _check_groups(adapter: ModelAdapter, first: int, last: int, cfg: PruneConfig) -> None:
    """Fails fast when the quantization group size does not divide the input width of a linear
    layer of blocks ``first .. last - 1``."""
    spec = spec_of(cfg)
    if spec is None:
        return
    for i in range(first, last):
        for name, lin in adapter.linears(i).items():
            spec.group_width(lin.in_features, f"block {i} {name}")


def _progress(
    cfg: PruneConfig, method: Method, adapter: ModelAdapter, start: int, last: int, nsamples: int
) -> Any:
    """One bar over the whole run: optimisation steps for learned methods (BESA), layers for the
    others."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    if method.learned:
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

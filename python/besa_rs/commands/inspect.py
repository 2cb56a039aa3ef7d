"""``besa-rs inspect PATH``"""

from __future__ import annotations

import argparse

from . import add_common, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list a checkpoint's tensors, sizes and zero fractions",
        description="Read a safetensors file or model directory (sharded or not) via mmap in Rust and "
        "print per tensor: name, dtype, shape, size, fraction of exact zeros; then a per-layer-type "
        "summary and totals. Packed tensors are verified (CRC-32 and structure) unless --no-verify.",
    )
    p.add_argument("path", help="safetensors file, or model directory")
    p.add_argument(
        "--summary", action="store_true", help="only the per-layer-type summary and totals"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip verifying packed tensors (by default every checksum and bitmask is checked)",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_file
    from ..inspection import format_report, inspect

    check_output_file(args.json, "--json")
    report = inspect(args.path, verify=not args.no_verify)
    return emit(args, report, lambda: format_report(report, per_tensor=not args.summary))

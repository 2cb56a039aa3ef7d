"""``besa-rs simulate MODEL``"""

from __future__ import annotations

import argparse

from .. import _native
from . import add_common, emit_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="estimate a sparse model's speed-up on the ViTCoD accelerator (cycle model in Rust)",
        description="Read every decoder-block weight of a saved model (safetensors file or Hugging Face "
        "directory, sharded or not, any float dtype) through mmap in Rust and estimate its cycles on the "
        "ViTCoD sparse accelerator. 'reference' mode reproduces the BESA paper's model exactly; 'full' mode "
        "adds a corrected model (DRAM traffic, format metadata, decode and prefill). See docs/simulator.md.",
    )
    p.add_argument("model", help="Hugging Face model directory or safetensors file")
    p.add_argument(
        "--mode",
        choices=("reference", "full"),
        default="reference",
        help="cycle model (default: reference)",
    )
    p.add_argument(
        "--plot", metavar="PNG", help="write a PNG of per-layer speed-ups per projection type"
    )
    p.add_argument(
        "--layers",
        metavar="PATTERN",
        help="regular expression: simulate only 2-D tensors whose name matches",
    )
    p.add_argument(
        "--per-matrix",
        action="store_true",
        help="print the per-matrix table (default: only for small models)",
    )
    g = p.add_argument_group("PE array and reference model")
    g.add_argument("--pe-width", type=int, default=64, help="PE array width (default 64)")
    g.add_argument("--pe-height", type=int, default=64, help="PE array height (default 64)")
    g.add_argument(
        "--start-ratio",
        type=float,
        default=0.5,
        help="first threshold ratio of the search (default 0.5)",
    )
    g.add_argument(
        "--ref-float",
        choices=("f32", "f64"),
        default="f32",
        help="precision of the threshold-search comparisons: f32 = what the authors' torch code does (default)",
    )
    f = p.add_argument_group("full mode (corrected model)")
    f.add_argument("--clock-mhz", type=float, help="clock (default 500)")
    f.add_argument("--bandwidth-gbs", type=float, help="DRAM bandwidth in GB/s (default 76.8)")
    f.add_argument("--value-bits", type=int, help="bits per weight value (default 16)")
    f.add_argument("--act-bits", type=int, help="bits per activation (default 16)")
    f.add_argument("--index-bits", type=int, help="bits per CSR column index (default 32)")
    f.add_argument(
        "--format",
        choices=_native.SIM_FORMATS,
        help="weight storage format (default bitmask)",
    )
    f.add_argument(
        "--prefill-tokens", type=int, help="tokens of the prefill step (default 2048); decode is 1"
    )
    f.add_argument("--weight-buffer-kb", type=float, help="on-chip weight buffer (default 106)")
    f.add_argument("--index-buffer-kb", type=float, help="on-chip index buffer (default 20)")
    f.add_argument("--input-buffer-kb", type=float, help="on-chip input buffer (default 53)")
    f.add_argument("--output-buffer-kb", type=float, help="on-chip output buffer (default 108)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._io import check_output_file
    from ..errors import ConfigError
    from ..simulation import FULL_KEYS, format_report, plot_report, simulate

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    full = {k: getattr(args, k) for k in FULL_KEYS if getattr(args, k) is not None}
    if args.mode == "reference" and full:
        flags = ", ".join("--" + k.replace("_", "-") for k in full)
        raise ConfigError(f"{flags}: only with --mode full")
    report = simulate(
        args.model,
        args.mode,
        layers=args.layers,
        progress=not args.quiet,
        pe_width=args.pe_width,
        pe_height=args.pe_height,
        start_ratio=args.start_ratio,
        float_mode=args.ref_float,
        **full,
    )
    if args.json != "-":
        print(format_report(report, per_matrix=True if args.per_matrix else None))
    if args.plot:
        plot_report(report, args.plot)
        if args.json != "-":
            print(f"plot: {args.plot}")
    emit_json(args.json, report)
    return 0

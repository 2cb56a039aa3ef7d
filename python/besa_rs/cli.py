"""The ``besa-rs`` command line. Each subcommand lives in ``besa_rs.commands.<name>`` and
imports heavy libraries (torch, transformers) only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import BesaError, first_line

#: Subcommands, in help order. Each module has ``register(subparsers)``.
COMMANDS: tuple[str, ...] = ("inspect", "eval", "prune", "simulate", "pack", "unpack")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="besa-rs",
        description="BESA pruning of LLMs, sparse-accelerator simulation and sparse checkpoint packing.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"besa-rs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"besa_rs.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BesaError as e:
        msg = first_line(e)
        print(f"besa-rs {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        # Environment failures (disk full, read-only file system, permissions) not already
        # turned into a BesaError: one line, no traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"besa-rs {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"besa-rs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""CLI subcommands; shared argument helpers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every subcommand has."""
    p.add_argument(
        "--json", metavar="PATH", help="also write the result as JSON to PATH ('-' for stdout)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, only the result")


def emit(
    args: argparse.Namespace, obj: Any, text: Callable[[], str], *, quiet: bool = False
) -> int:
    """A command's result: ``text()`` on stdout unless the JSON goes there (``--json -``) or
    ``quiet``, then ``obj`` as JSON where ``--json`` asks. Returns 0, the exit status; warnings
    in ``obj["warnings"]`` go to stderr first, one line each."""
    for w in obj.get("warnings", []) if isinstance(obj, dict) else []:
        print(f"besa-rs {args.command}: WARNING: {w}", file=sys.stderr)
    if args.json != "-" and not quiet:
        print(text())
    emit_json(args.json, obj)
    return 0


def emit_json(path: str | None, obj: Any) -> None:
    if not path:
        return
    if path == "-":
        json.dump(obj, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from .._io import write_json_atomic

    write_json_atomic(path, obj)

"""CLI subcommands; shared argument helpers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every subcommand has."""
    p.add_argument(
        "--json", metavar="PATH", help="also write the result as JSON to PATH ('-' for stdout)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, only the result")


def emit_json(path: str | None, obj: Any) -> None:
    if not path:
        return
    if path == "-":
        json.dump(obj, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from .._io import write_json_atomic

    write_json_atomic(path, obj)

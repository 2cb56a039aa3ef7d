"""``python -m besa_rs.ste build [--verbose]``: compile (or find cached) the CUDA extension."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m besa_rs.ste", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the fused CUDA extension into the cache")
    b.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    from . import _ext

    t0 = time.perf_counter()
    try:
        mod = _ext.build(verbose=args.verbose)
    except _ext.ExtensionBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"besa_rs.ste CUDA extension ready in {time.perf_counter() - t0:.1f} s: {mod.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

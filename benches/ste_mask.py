"""Benchmark of the straight-through mask: authors' formulation vs the fused op.

One run prints, for forward + backward at one layer shape (default 11008 x 4096, row-wise,
101 candidates), the time and the peak extra memory of

* ``reference``   - the authors' formulation (tests/ste_reference.py: candidate map, matmul,
                    scatter, STE combination), autograd backward;
* ``fused-torch`` - besa_rs.ste.ste_mask with the vectorised, chunked PyTorch fallback;
* ``fused-cuda``  - besa_rs.ste.ste_mask with the CUDA extension (GPU only).

Peak extra memory is measured, not estimated: on CPU each variant runs in its own subprocess
which resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) after building its inputs
and reads ``VmHWM`` after forward + backward (extra = VmHWM - VmRSS before the call); on GPU it
is ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call. Inputs
(weight, ranks or sort indices, logits, upstream gradient) are excluded; outputs and gradients
are included. Time: the first (measured) call, then ``--repeat`` rounds in one process in which
the variants alternate (so that a busy machine slows them alike); best and median wall clock
(synchronised on GPU) are printed.

Usage: python benches/ste_mask.py [--rows 11008 --cols 4096 --step 0.01 --gran row]
       [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ste_reference import reference_ste  # noqa: E402

from besa_rs import ste  # noqa: E402

VARIANTS_CPU = ("reference", "fused-torch")
VARIANTS_GPU = ("reference", "fused-torch", "fused-cuda")


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(variant: str, rows: int, cols: int, groups: int, step: float, device: str):
    """Inputs of one variant (only what it needs: sort indices or ranks)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen).to(device)
    importance = (weight.abs() * torch.rand(1, cols, generator=gen).to(device)).contiguous()
    cands = ste.candidate_sparsities(step).to(device)
    logits = (torch.randn(groups, cands.numel(), generator=gen) * 0.5).to(device)
    upstream = torch.randn(rows, cols, generator=gen).to(device)
    if variant == "reference":
        index = torch.sort(importance, dim=1, stable=True).indices
    else:
        index = ste.row_ranks(importance)
    del importance
    return weight, index, logits, cands, upstream


def run_once(variant: str, weight, index, logits, cands, upstream) -> torch.Tensor:
    lg = logits.detach().requires_grad_(True)
    if variant == "reference":
        out = reference_ste(weight, index, lg, cands)[0]
    else:
        out = ste.ste_mask(weight, index, lg, cands)
    out.backward(upstream)
    assert lg.grad is not None
    return lg.grad


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    variant: str, rows: int, cols: int, groups: int, step: float, device: str, repeat: int
) -> dict:
    if variant == "fused-torch":
        os.environ["BESA_STE_BACKEND"] = "torch"
    else:
        os.environ.pop("BESA_STE_BACKEND", None)
    backend = "reference" if variant == "reference" else ste.backend(device)
    if variant == "fused-cuda" and backend != "cuda-ext":
        raise RuntimeError("fused-cuda asked but the CUDA extension is not available")
    # warm-up on a few rows: pages in library code and starts thread pools before measuring
    small = make_inputs(variant, 8, cols, 8 if groups == rows else 1, step, device)
    run_once(variant, *small)
    del small
    inputs = make_inputs(variant, rows, cols, groups, step, device)
    gc.collect()
    if device == "cuda":
        if variant != "reference":  # JIT build / load outside the measurement
            ste.backend(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status("VmRSS")
    t0 = time.perf_counter()
    grad = run_once(variant, *inputs)
    _sync(device)
    first = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status("VmHWM") - before
    del grad
    times = [first]
    for _ in range(repeat - 1):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        run_once(variant, *inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "backend": backend,
        "device": device,
        "first_s": first,
        "best_s": min(times),
        "peak_extra_bytes": int(peak),
    }


def time_interleaved(
    variants: tuple[str, ...],
    rows: int,
    cols: int,
    groups: int,
    step: float,
    device: str,
    rounds: int,
) -> dict[str, list[float]]:
    """Wall time of each variant, alternating variants round after round (fair under load)."""
    inputs = {v: make_inputs(v, rows, cols, groups, step, device) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            if v == "fused-torch":
                os.environ["BESA_STE_BACKEND"] = "torch"
            else:
                os.environ.pop("BESA_STE_BACKEND", None)
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            run_once(v, *inputs[v])
            _sync(device)
            times[v].append(time.perf_counter() - t0)
    return times


def run_variant_subprocess(variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--rows",
        str(args.rows),
        "--cols",
        str(args.cols),
        "--step",
        str(args.step),
        "--gran",
        args.gran,
        "--device",
        args.device,
        "--repeat",
        str(args.repeat),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    # (the memory workers measure one call each; "time" alternates the variants)
    if res.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def groups_for(gran: str, rows: int) -> int:
    if gran == "row":
        return rows
    if gran == "layer":
        return 1
    return rows // int(gran.split(":")[1])  # "block:k"


def report(results: list[dict], title: str) -> list[str]:
    ref = next(r for r in results if r["variant"] == "reference")
    lines = [title]
    lines.append(
        f"{'variant':<12} {'backend':<10} {'first s':>9} {'best s':>9} {'median s':>9}"
        f" {'peak extra MiB':>15}"
        f" {'mem / ref':>10} {'time / ref':>10}"
    )
    for r in results:
        lines.append(
            f"{r['variant']:<12} {r['backend']:<10} {r['first_s']:>9.4f} {r['best_s']:>9.4f}"
            f" {r['median_s']:>9.4f}"
            f" {r['peak_extra_bytes'] / 2**20:>15.1f}"
            f" {r['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):>10.3f}"
            f" {r['best_s'] / ref['best_s']:>10.3f}"
        )
    fused = next(r for r in results if r["variant"] == "fused-torch")
    mem_ratio = fused["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1)
    time_ratio = fused["best_s"] / ref["best_s"]
    lines.append(
        f"fused-torch / reference: memory {mem_ratio:.3f} (target <= 0.333: "
        f"{'met' if mem_ratio <= 1 / 3 else 'NOT met'}), time {time_ratio:.3f} "
        f"(target <= 1: {'met' if time_ratio <= 1 else 'NOT met'})"
    )
    cuda = [r for r in results if r["variant"] == "fused-cuda"]
    if cuda:
        speedup = ref["best_s"] / cuda[0]["best_s"]
        lines.append(
            f"fused-cuda speed-up over reference: {speedup:.2f}x (target >= 3: "
            f"{'met' if speedup >= 3 else 'NOT met'}), memory ratio "
            f"{cuda[0]['peak_extra_bytes'] / max(ref['peak_extra_bytes'], 1):.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=11008)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--step", type=float, default=0.01)
    p.add_argument("--gran", default="row", help="row | layer | block:K")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=5, help="timing rounds (variants alternate)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    groups = groups_for(args.gran, args.rows)
    if args.worker == "time":
        variants = VARIANTS_GPU if args.device == "cuda" else VARIANTS_CPU
        times = time_interleaved(
            variants, args.rows, args.cols, groups, args.step, args.device, args.repeat
        )
        print(json.dumps(times))
        return 0
    if args.worker:
        res = measure(args.worker, args.rows, args.cols, groups, args.step, args.device, 1)
        print(json.dumps(res))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    variants = VARIANTS_GPU if args.device == "cuda" else VARIANTS_CPU
    results = []
    for v in variants:
        if args.device == "cuda":
            results.append(measure(v, args.rows, args.cols, groups, args.step, "cuda", 1))
            torch.cuda.empty_cache()
        else:
            results.append(run_variant_subprocess(v, args))
    if args.device == "cuda":
        times = time_interleaved(
            variants, args.rows, args.cols, groups, args.step, "cuda", args.repeat
        )
    else:
        times = run_variant_subprocess("time", args)
    for r in results:
        ts = sorted(times[r["variant"]])
        r["best_s"] = ts[0]
        r["median_s"] = ts[len(ts) // 2]
        r["times_s"] = times[r["variant"]]
    title = (
        f"ste_mask forward+backward, {args.rows} x {args.cols}, {args.gran}-wise, "
        f"{round(1 / args.step) + 1} candidates, fp32, {args.device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    lines = report(results, title)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"title": title, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

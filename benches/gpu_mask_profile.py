"""Where the straight-through mask's time goes on a GPU: kernel time vs host overhead.

    python benches/gpu_mask_profile.py [--json PATH]

For each shape / dtype (11008 x 4096 and 4096 x 4096 fp32 as in benches/ste_mask.py, and the
seven linear layers of one LLaMA-2-70B block in bf16 with int16 ranks, 101 candidates,
row-wise), forward + backward of ``besa_rs.ste.ste_mask`` with the CUDA extension:

* wall time per call (synchronised; best of 20 after warm-up);
* GPU kernel time per call (sum over the device events, i.e. kernels and copies, of a
  ``torch.profiler`` trace / calls; the aten / extension ops that launched them also carry
  device time and are left out so that nothing is counted twice) and the top kernels by GPU
  time, so the gap between wall and kernel time is the host's (launches, syncs, Python).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from besa_rs import ste  # noqa: E402

L70 = [
    (8192, 8192),
    (1024, 8192),
    (1024, 8192),
    (8192, 8192),
    (28672, 8192),
    (28672, 8192),
    (8192, 28672),
]


def inputs(rows, cols, dtype, rank_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    imp = w.float().abs() * torch.rand(1, cols, device="cuda", generator=g)
    ranks = ste.row_ranks(imp).to(rank_dtype)
    cands = ste.candidate_sparsities(0.01).cuda()
    logits = torch.randn(rows, cands.numel(), device="cuda", generator=g) * 0.5
    up = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    return w, ranks, logits, cands, up


def call(w, ranks, logits, cands, up):
    lg = logits.detach().requires_grad_(True)
    out = ste.ste_mask(w, ranks, lg, cands)
    out.backward(up)
    return lg.grad


def measure(cases, label, lines, results):
    start = len(lines)
    for c in cases:
        call(*c)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        for c in cases:
            call(*c)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for c in cases:
                call(*c)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # device events (kernels, memcpy) only: an op's device time is its kernels' time again
    kernels = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    note = ""
    if not kernels:  # a profiler that does not tag device events: everything, double-counted
        kernels, note = list(events), " (ops and kernels both counted)"
    gpu_us = sum(e.self_device_time_total for e in kernels) / 5
    n_kernels = sum(e.count for e in kernels) / 5
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    lines.append(
        f"{label}: wall best {min(times) * 1e3:.3f} ms, median "
        f"{sorted(times)[10] * 1e3:.3f} ms; GPU kernels {gpu_us / 1e3:.3f} ms per call"
        f" ({n_kernels:.0f} device events){note}"
    )
    # bytes the two big kernels must move: select reads W and the ranks and writes the output;
    # the bucket sums read g, W and the ranks
    n_el = sum(c[0].numel() for c in cases)
    e_w, e_r = cases[0][0].element_size(), cases[0][1].element_size()
    moved = {"select_kernel": n_el * (2 * e_w + e_r), "bucket_kernel": n_el * (2 * e_w + e_r)}
    for e in top:
        if e.self_device_time_total <= 0:
            continue
        rate = ""
        for k, nbytes in moved.items():
            if k in e.key:
                ms = e.self_device_time_total / 5 / 1e3
                rate = f"  [{nbytes / 1e9:.2f} GB moved: {nbytes / (ms * 1e-3) / 1e12:.2f} TB/s]"
        lines.append(
            f"    {e.self_device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:<3} {e.key[:90]}"
            f"{rate}"
        )
    results.append(
        {
            "label": label,
            "wall_best_ms": min(times) * 1e3,
            "gpu_ms": gpu_us / 1e3,
            "device_events_per_call": n_kernels,
            "top": [(e.key, e.self_device_time_total / 5 / 1e3, e.count / 5) for e in top],
        }
    )
    print("\n".join(lines[start:]), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print("backend", ste.backend("cuda"), torch.cuda.get_device_name(0), flush=True)
    lines: list[str] = []
    results: list[dict] = []
    measure(
        [inputs(11008, 4096, torch.float32, torch.int64)], "11008x4096 fp32 int64", lines, results
    )
    measure(
        [inputs(11008, 4096, torch.float32, torch.int16)], "11008x4096 fp32 int16", lines, results
    )
    measure(
        [inputs(4096, 4096, torch.float32, torch.int16)], "4096x4096 fp32 int16", lines, results
    )
    measure(
        [inputs(r, c, torch.bfloat16, torch.int16) for r, c in L70],
        "LLaMA-2-70B block, 7 layers, bf16 int16",
        lines,
        results,
    )
    path = a.json or (
        os.path.join(os.environ["OUT"], "gpu_mask_profile.json") if "OUT" in os.environ else None
    )
    if path:
        Path(path).write_text(json.dumps({"lines": lines, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of ``besa-rs simulate`` (not a test): prints, in one run,

1. the Rust engine vs the vectorised numpy port of the reference model (tests/
   test_simulate_oracle.py::numpy_port) on the same 4096 x 4096 and 11008 x 4096 random 50%
   masks (and that they agree); target: at least 1000x on 11008 x 4096;
2. a whole LLaMA-7B-shaped model (32 layers x q,k,v,o,gate,up,down random 50% masks, bf16
   safetensors, one shard per layer, generated here and cached under --dir) simulated from the
   files through the public API, next to the time to read its weights once (every shard read
   sequentially, same run); target: at most 10 s on 2 threads. Also wall time, peak anonymous
   memory and peak RSS.

Usage: .venv/bin/python benches/simulate.py [--dir /tmp/besa-sim-bench-7b] [--threads 2]
       [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_simulate_oracle import numpy_port  # noqa: E402

import besa_rs  # noqa: E402
from besa_rs.simulation import format_report  # noqa: E402

HIDDEN, INTER, LAYERS = 4096, 11008, 32
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


MATRIX_TARGET = 1000  # x the numpy port on 11008 x 4096
MODEL_TARGET_S = 10.0  # LLaMA-7B-shaped model, 2 threads


def bench_matrices() -> None:
    rng = np.random.default_rng(0)
    print("== one matrix: Rust engine vs vectorised numpy port (same bool mask, reference mode)")
    print(f"{'shape':>14} {'rust ms':>9} {'numpy ms':>10} {'speed-up':>9}  cycles (rust / numpy)")
    ratio = 0.0
    for shape in [(4096, 4096), (11008, 4096)]:
        keep = rng.random(shape) < 0.5
        besa_rs.simulate_matrix(keep)  # warm-up (thread pool)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            r = besa_rs.simulate_matrix(keep)
            times.append(time.perf_counter() - t)
        t_rust = min(times)
        t = time.perf_counter()
        cyc, _flops = numpy_port(keep)
        t_np = time.perf_counter() - t
        print(
            f"{shape[0]:>6} x {shape[1]:<5} {1e3 * t_rust:9.2f} {1e3 * t_np:10.1f} {t_np / t_rust:8.0f}x  "
            f"{r['cycles']} / {cyc} {'(equal)' if cyc == r['cycles'] else '(DIFFERENT!)'}"
        )
        ratio = t_np / t_rust
    verdict = "met" if ratio >= MATRIX_TARGET else "NOT met"
    print(f"11008 x 4096: {ratio:.0f}x the numpy port (target >= {MATRIX_TARGET}x: {verdict})")


def write_shard(path: Path, layer: int, rng: np.random.Generator) -> None:
    """One layer's 7 matrices as BF16 (1.0 or 0.0, i.i.d. 50%), streamed to disk."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for mod, (r, c) in SHAPES.items():
        n = r * c * 2
        header[f"model.layers.{layer}.{mod}.weight"] = {
            "dtype": "BF16",
            "shape": [r, c],
            "data_offsets": [off, off + n],
        }
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _mod, (r, c) in SHAPES.items():
            bits = rng.integers(0, 2, size=(r, c), dtype=np.uint16)
            (bits * np.uint16(0x3F80)).tofile(f)  # bf16 1.0 = 0x3F80
    os.replace(tmp, path)


def make_model(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{LAYERS:05d}.safetensors" for i in range(LAYERS)]
    index = root / "model.safetensors.index.json"
    if index.exists() and all((root / n).exists() for n in names):
        return
    t = time.perf_counter()
    rng = np.random.default_rng(7)
    for i, n in enumerate(names):
        if not (root / n).exists():
            write_shard(root / n, i, rng)
    wm = {f"model.layers.{i}.{mod}.weight": names[i] for i in range(LAYERS) for mod in SHAPES}
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    print(f"(generated the model in {time.perf_counter() - t:.1f} s)")


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def read_once(files: list[Path]) -> float:
    """Seconds to read every byte of ``files`` once, sequentially (64 MiB at a time)."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t


def bench_model(root: Path) -> None:
    make_model(root)
    files = sorted(root.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    print(
        f"\n== LLaMA-7B-shaped model: {LAYERS} layers x 7 matrices, bf16, {size / 1e9:.1f} GB in {root}"
    )
    try:  # reset the peak-RSS counter so VmHWM covers the model run only
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    peak_anon = [status_kb("RssAnon")]
    base_anon = peak_anon[0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))
            time.sleep(0.02)

    t_read = read_once(files)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    cpu0 = os.times()
    t = time.perf_counter()
    rep = besa_rs.simulate(root)
    wall = time.perf_counter() - t
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    done.set()
    th.join()
    print(
        f"threads: {os.environ.get('RAYON_NUM_THREADS', os.cpu_count())} (cores: {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}: other processes compete for the cores)"
    )
    print(
        f"simulated {len(rep['matrices'])} matrices in {wall:.1f} s "
        f"(CPU time {cpu:.1f} s, user + system, all threads)"
    )
    print(
        f"read the weights once: {t_read:.1f} s ({size / t_read / 1e9:.2f} GB/s); "
        f"simulate / read = {wall / t_read:.2f}x"
    )
    verdict = "met" if wall <= MODEL_TARGET_S else "NOT met"
    print(f"target <= {MODEL_TARGET_S:.0f} s on 2 threads: {verdict}")
    print(
        f"anonymous memory: {base_anon / 1024:.0f} MB before, peak {peak_anon[0] / 1024:.0f} MB "
        f"(+{(peak_anon[0] - base_anon) / 1024:.0f} MB); peak RSS during the run, mapped file pages included: "
        f"{status_kb('VmHWM') / 1024:.0f} MB"
    )
    print(format_report(rep, per_matrix=False))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dir", default="/tmp/besa-sim-bench-7b", help="where the generated model is cached"
    )
    ap.add_argument("--skip-model", action="store_true", help="only the single-matrix comparison")
    ap.add_argument(
        "--threads", type=int, default=2, help="worker threads (RAYON_NUM_THREADS; default 2)"
    )
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # before the pool starts
    bench_matrices()
    if not args.skip_model:
        bench_model(Path(args.dir))


if __name__ == "__main__":
    main()

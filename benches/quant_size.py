"""Size table and pack/unpack throughput of the quantized packed formats (issue 11).

The default model (smollm2-135m, bf16) with its block linears pruned to 50% per row by
magnitude and quantized round-to-nearest to N bits in groups of G (default 4 bits, G = 64;
``besa_rs.pruning.quant.rtn``, the same grid ``besa-rs prune --wbits`` saves), written as a
pruned model directory with ``quantization.safetensors``. Then:

1. Size: dense bf16 file (model.safetensors, without the side file), bitmask, pack-quantized,
   bitmask-quantized: bytes, ratio to the dense file, ratio to the format's ideal. Ideal of a
   file: 8 + header + copied tensors + per packed module: bitmask R*ceil(C/8) + nnz*itemsize
   + 8R (as benches/pack.py); pack-quantized R*C*N/8 + groups*(itemsize + N/8);
   bitmask-quantized R*C/8 + nnz*N/8 + groups*(itemsize + N/8) (docs/formats.md).
2. Throughput: ``besa_rs.pack`` / ``unpack`` (Rust) against the numpy reference implementation
   of the same layouts (tests/quant_formats_ref.py: ``pack_dir`` / ``unpack_dir``), same input,
   same run; MB/s of dense weight bytes of the quantized matrices, best of ``--repeat``; and
   the CPU seconds (user + system, all threads) of each, best of ``--repeat``.

The numpy rows always run; the Rust rows say so when the Rust codecs are not there.
Usage: python benches/quant_size.py [--bits 4] [--group-size 64] [--repeat 3] [--skip-rust]
       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import quant_formats_ref as ref  # noqa: E402


def prune_quantize(src: str, out: Path, bits: int, group: int) -> dict[str, Any]:
    from besa_rs.models import load_model
    from besa_rs.pruning import quant

    model = load_model(src, dtype="bfloat16")
    spec = quant.QuantSpec(bits, group).check()
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if ".layers." in name and isinstance(mod, torch.nn.Linear):
                w = mod.weight
                k = w.shape[1] // 2
                idx = w.abs().argsort(dim=1)[:, :k]
                w.scatter_(1, idx, 0.0)
                quant.attach(mod, quant.rtn(w, spec, name=name))
                n += 1
    model.save_pretrained(out, safe_serialization=True)
    quant.write_quant_file(model, out)
    return {"layers": n}


def header_len(f: Path) -> int:
    with open(f, "rb") as fh:
        return int(struct.unpack("<Q", fh.read(8))[0])


def ideal_bytes(d: Path, fmt: str, bits: int) -> float:
    """The format's ideal over every safetensors file of ``d`` (see the module docstring)."""
    total = 0.0
    for f in model_files(d):
        tensors, _ = ref.read_safetensors(f)
        total += 8 + header_len(f)
        anchor = {"bitmask": "bitmask", "bitmask-quantized": "bitmask"}.get(fmt, "weight_packed")
        mods = {k[: -len(anchor) - 1] for k in tensors if k.endswith("." + anchor)}
        for k, (_dt, a) in tensors.items():
            if k.rsplit(".", 1)[0] not in mods:
                total += a.nbytes
        for m in mods:
            if fmt == "bitmask":
                rows, cols = (int(x) for x in tensors[f"{m}.shape"][1])
                nnz = tensors[f"{m}.compressed"][1].size
                item = tensors[f"{m}.compressed"][1].dtype.itemsize
                total += rows * ((cols + 7) // 8) + nnz * item + rows * 8  # as benches/pack.py
                continue
            scale = tensors[f"{m}.weight_scale"][1]
            item, groups = scale.dtype.itemsize, scale.size
            if fmt == "pack-quantized":
                rows, cols = (int(x) for x in tensors[f"{m}.weight_shape"][1])
                total += rows * cols * bits / 8 + groups * (item + bits / 8)
            else:
                rows, cols = (int(x) for x in tensors[f"{m}.shape"][1])
                nnz = int(np.unpackbits(tensors[f"{m}.bitmask"][1], axis=1).sum())
                total += ref.bitmask_quantized_ideal_bytes(
                    rows, cols, nnz, scale.shape[1], bits, item
                )
    return total


def model_files(d: Path) -> list[Path]:
    """The checkpoint's safetensors files (not prune's side file quantization.safetensors)."""
    return sorted(p for p in d.glob("*.safetensors") if p.name != "quantization.safetensors")


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in model_files(d))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_time(fn, repeat: int, cleanup) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best wall-clock seconds and best CPU seconds (all threads) of ``repeat`` runs."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        cleanup()
        t, c = time.perf_counter(), cpu_seconds()
        fn()
        best = min(best, time.perf_counter() - t)
        best_cpu = min(best_cpu, cpu_seconds() - c)
    return best, best_cpu


def throughput(
    fmt: str, src: Path, tmp: Path, repeat: int, use_rust: bool
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float] | None]]:
    """Best-of-``repeat`` (wall, CPU) seconds of pack and unpack: numpy reference, and Rust if
    asked."""
    from besa_rs.packing import pack, unpack

    po, uo = tmp / f"t-pack-{fmt}", tmp / f"t-unpack-{fmt}"

    def rm(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)

    t_np = {
        "pack": best_time(lambda: ref.pack_dir(src, po, fmt), repeat, lambda: rm(po)),
        "unpack": best_time(lambda: ref.unpack_dir(tmp / f"ref-{fmt}", uo), repeat, lambda: rm(uo)),
    }
    t_rs: dict[str, tuple[float, float] | None] = {"pack": None, "unpack": None}
    if use_rust:
        t_rs["pack"] = best_time(lambda: pack(src, po, fmt, sync=False), repeat, lambda: rm(po))
        t_rs["unpack"] = best_time(
            lambda: unpack(tmp / f"rs-{fmt}", uo, sync=False), repeat, lambda: rm(uo)
        )
    rm(po)
    rm(uo)
    return t_np, t_rs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-rust", action="store_true", help="numpy rows only")
    ap.add_argument("--json", help="write the numbers as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="besa-rs (rayon) threads")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.threads:
        # read by rayon when its pool starts (at the first pack)
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    from besa_rs import BesaError
    from besa_rs.models import resolve_model
    from besa_rs.packing import pack

    bits, gs = args.bits, args.group_size
    results: dict[str, Any] = {"bits": bits, "group_size": gs, "sizes": {}, "throughput": {}}
    with tempfile.TemporaryDirectory(prefix="besa-qsize-") as tmp_s:
        tmp = Path(tmp_s)
        src = tmp / "pruned"
        info = prune_quantize(str(resolve_model(args.model)), src, bits, gs)
        side = ref.read_safetensors(src / "quantization.safetensors")[0]
        dense_w = sum(
            a.size * 2 for k, (_dt, a) in side.items() if k.endswith(".weight_codes")
        )  # bf16 bytes of the quantized matrices
        print(
            f"== {args.model}: {info['layers']} block linears, 50% per row (magnitude) + "
            f"{bits}-bit RTN, groups of {gs} (bf16)"
        )
        dense = dir_bytes(src)
        print(
            f"   quantized matrices: {dense_w:,} dense bytes; everything else (embeddings, "
            f"lm_head, norms; copied by every format): {dense - dense_w:,} bytes"
        )
        rows = [("dense bf16", dense, float(dense))]
        results["sizes"]["dense"] = {"bytes": dense}
        # numpy reference files (always)
        for fmt in ("pack-quantized", "bitmask-quantized"):
            o = tmp / f"ref-{fmt}"
            ref.pack_dir(src, o, fmt)
            rows.append((f"{fmt} (numpy ref)", dir_bytes(o), ideal_bytes(o, fmt, bits)))
        if not args.skip_rust:
            for fmt in ("bitmask", "pack-quantized", "bitmask-quantized"):
                o = tmp / f"rs-{fmt}"
                try:
                    pack(src, o, fmt, sync=False)
                except BesaError as e:
                    print(f"   besa-rs pack --format {fmt}: not available ({e})")
                    continue
                rows.append((fmt, dir_bytes(o), ideal_bytes(o, fmt, bits)))
        print(f"{'format':32} {'bytes':>14} {'/ dense':>9} {'/ ideal':>9}")
        for name, size, ideal in rows:
            print(f"{name:32} {size:14,} {size / dense:9.4f} {size / ideal:9.4f}")
            results["sizes"][name] = {"bytes": size, "ideal": ideal}

        print(
            f"\n== throughput (MB/s of the {dense_w / 1e6:.1f} MB of dense bf16 quantized "
            f"weights, best of {args.repeat}; {os.cpu_count()} CPUs, besa-rs threads "
            f"{os.environ.get('RAYON_NUM_THREADS', 'all')}, numpy single-threaded; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})"
        )
        print(
            f"{'format':20} {'op':7} {'numpy ref':>10} {'besa-rs':>10} {'speed-up':>9}"
            f" | CPU s: {'numpy':>7} {'besa-rs':>8} {'ratio':>7}"
        )
        for fmt in ("pack-quantized", "bitmask-quantized"):
            use_rust = not args.skip_rust and (tmp / f"rs-{fmt}").is_dir()
            t_np, t_rs = throughput(fmt, src, tmp, args.repeat, use_rust)
            for op in ("pack", "unpack"):
                (a, ca), b = t_np[op], t_rs[op]
                mb_np = dense_w / a / 1e6
                if b is None:
                    print(f"{fmt:20} {op:7} {mb_np:10.1f} {'-':>10} {'-':>9}")
                    results["throughput"][f"{fmt}/{op}"] = {"numpy_s": a, "numpy_cpu_s": ca}
                    continue
                (b, cb) = b
                print(
                    f"{fmt:20} {op:7} {mb_np:10.1f} {dense_w / b / 1e6:10.1f} {a / b:8.1f}x"
                    f" |        {ca:7.3f} {cb:8.3f} {ca / cb:6.1f}x"
                )
                results["throughput"][f"{fmt}/{op}"] = {
                    "numpy_s": a,
                    "rust_s": b,
                    "numpy_cpu_s": ca,
                    "rust_cpu_s": cb,
                }
        print(
            "speed-up: wall-clock, the issue's measure (target >= 5x); CPU s: user + system "
            "seconds of all threads, the work done, less sensitive to other load on the machine"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

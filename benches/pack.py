"""Benchmark of ``besa-rs pack`` / ``unpack`` (issue 4), printed side by side in one run.

1. Size: the default model (smollm2-135m) magnitude-pruned to 50% per row in its block linears
   (torch, in this script), fp32 and cast to bf16: packed size vs the bitmask format's ideal
   (nnz * itemsize + R * ceil(C/8) + R * 8 per matrix, plus the unchanged tensors) and the
   ratio to the dense checkpoint.
2. Throughput on a synthetic checkpoint with 7B-layer matrix shapes (bf16, random 50%):
   pack and unpack time against (a) a plain file copy of the dense checkpoint (the larger side
   of both operations, issue 13's measure; the copy of the packed files is printed too) and
   (b) a numpy/torch implementation of the same bitmask encoding (packbits + boolean
   indexing, written with safetensors). ``--layers`` scales the layer count (32 = full 7B, 13 GB).
3. Fuzz: random mutations of a valid packed file fed to the reader for a bounded time; the
   number of cases and that every one ended in a BesaError (never a crash) are reported.

Usage: python benches/pack.py [--layers 4] [--repeat 2] [--fuzz-seconds 20] [--skip-model]
       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from besa_rs import BesaError
from besa_rs.packing import load_packed, pack, unpack

SHAPES_7B = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
]


def dir_size(d: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in d.glob(pattern))


def prune_rows_(model: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith(".weight") and p.dim() == 2:
                k = int(p.shape[1] * sparsity)
                idx = p.abs().argsort(dim=1)[:, :k]
                p.scatter_(1, idx, 0.0)


def size_section(tmp: Path) -> None:
    from besa_rs.models import load_model, resolve_model

    src = resolve_model("smollm2-135m")
    print(f"== size: smollm2-135m ({src}), block linears magnitude-pruned to 50% per row")
    print(
        f"{'dtype':6} {'dense file':>12} {'packed file':>12} {'ideal':>12} {'packed/ideal':>12} {'packed/dense':>12}"
    )
    for dtype in ("float32", "bfloat16"):
        model = load_model(src, dtype=dtype)
        prune_rows_(model, 0.5)
        d = tmp / f"pruned-{dtype}"
        model.save_pretrained(d, safe_serialization=True)
        r = pack(d, tmp / f"packed-{dtype}", sync=False)
        dense = dir_size(d)
        packed = dir_size(tmp / f"packed-{dtype}")
        ideal = r["totals"]["ideal_bytes"]
        print(
            f"{dtype:6} {dense:12,} {packed:12,} {ideal:12,} {packed / ideal:12.4f} {packed / dense:12.4f}"
        )
        shutil.rmtree(tmp / f"packed-{dtype}")
        shutil.rmtree(d)


def synth_checkpoint(d: Path, layers: int) -> int:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    wm = {}
    total = 0
    for i in range(layers):
        tensors = {}
        for name, r, c in SHAPES_7B:
            w = torch.randn(r, c, generator=g, dtype=torch.float32).to(torch.bfloat16)
            w[torch.rand(r, c, generator=g) < 0.5] = 0
            tensors[f"model.layers.{i}.{name}.weight"] = w
            total += w.numel() * 2
        fn = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, d / fn, metadata={"format": "pt"})
        wm.update(dict.fromkeys(tensors, fn))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
    )
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return total


def copy_baseline(src: Path, dst: Path) -> None:
    dst.mkdir()
    for p in src.glob("*.safetensors"):
        with open(p, "rb") as fi, open(dst / p.name, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 24)


def numpy_pack(src: Path, dst: Path) -> None:
    """The same bitmask encoding with numpy/torch: mask, packbits, boolean indexing, cumsum."""
    from safetensors import safe_open

    dst.mkdir()
    for p in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(p, framework="pt") as f:
            for name in f.keys():
                w = f.get_tensor(name)
                mask = w != 0
                m = name[: -len(".weight")]
                counts = mask.sum(dim=1)
                out[f"{m}.shape"] = torch.tensor(list(w.shape))
                out[f"{m}.compressed"] = w[mask]
                out[f"{m}.bitmask"] = torch.from_numpy(
                    np.packbits(mask.numpy(), axis=-1, bitorder="little")
                )
                out[f"{m}.row_offsets"] = torch.cumsum(counts, 0) - counts
        save_file(out, dst / p.name, metadata={"format": "pt"})


def numpy_unpack(src: Path, dst: Path) -> None:
    from safetensors import safe_open

    dst.mkdir()
    for p in sorted(src.glob("*.safetensors")):
        parts: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(p, framework="pt") as f:
            for name in f.keys():
                m, _, part = name.rpartition(".")
                parts.setdefault(m, {})[part] = f.get_tensor(name)
        out = {}
        for m, d in parts.items():
            shape = d["shape"].tolist()
            mask = np.unpackbits(
                d["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little"
            ).astype(bool)
            w = torch.zeros(shape, dtype=d["compressed"].dtype)
            w[torch.from_numpy(mask)] = d["compressed"]
            out[f"{m}.weight"] = w
        save_file(out, dst / p.name, metadata={"format": "pt"})


def timed(fn, repeat: int, cleanup) -> float:
    best = float("inf")
    for _ in range(repeat):
        cleanup()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def throughput_section(tmp: Path, layers: int, repeat: int) -> None:
    src = tmp / "synth"
    n = synth_checkpoint(src, layers)
    print(
        f"\n== throughput: synthetic bf16 checkpoint, {layers} x 7 matrices of 7B shapes, random 50% "
        f"({n / 1e9:.2f} GB of tensors; {os.cpu_count()} CPUs, besa-rs threads "
        f"{os.environ.get('RAYON_NUM_THREADS', 'all')}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; page cache warm; no fsync anywhere)"
    )
    for p in src.glob("*"):
        p.read_bytes()  # warm the page cache
    outs = {k: tmp / k for k in ("copy", "rs-pack", "np-pack", "rs-unpack", "np-unpack")}

    def rm(k):
        return lambda: shutil.rmtree(outs[k], ignore_errors=True)

    t_copy = timed(lambda: copy_baseline(src, outs["copy"]), repeat, rm("copy"))
    t_rs = timed(
        lambda: pack(src, outs["rs-pack"], min_sparsity=0.0, sync=False, shard_size="50GB"),
        repeat,
        rm("rs-pack"),
    )
    t_np = timed(lambda: numpy_pack(src, outs["np-pack"]), max(1, repeat - 1), rm("np-pack"))
    # unpack: the packed directory as input (its size is the input size)
    packed_n = dir_size(outs["rs-pack"])
    t_rsu = timed(
        lambda: unpack(outs["rs-pack"], outs["rs-unpack"], sync=False, shard_size="50GB"),
        repeat,
        rm("rs-unpack"),
    )
    t_npu = timed(
        lambda: numpy_unpack(outs["np-pack"], outs["np-unpack"]),
        max(1, repeat - 1),
        rm("np-unpack"),
    )
    t_copy_p = timed(
        lambda: copy_baseline(outs["rs-pack"], tmp / "copy-p"),
        repeat,
        lambda: shutil.rmtree(tmp / "copy-p", ignore_errors=True),
    )

    # the two implementations agree
    a, b = load_packed(outs["rs-unpack"]), load_packed(outs["np-unpack"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
        "rust and numpy unpack differ"
    )
    del a, b

    # Issue 13's target: each operation against the copy of its larger side, the dense
    # checkpoint (pack's input, unpack's output). The copy of unpack's own (packed) input is
    # printed too, labelled as such.
    print(
        f"{'op':7} {'besa-rs':>9} {'GB/s dense':>10} | {'copy of dense':>13} {'ratio':>6} "
        f"{'target':>7} | {'numpy/torch':>11} {'speed-up':>8}"
    )
    for what, t, base in (("pack", t_rs, t_np), ("unpack", t_rsu, t_npu)):
        print(
            f"{what:7} {t:7.2f} s {n / t / 1e9:10.2f} | {t_copy:11.2f} s {t / t_copy:5.2f}x "
            f"{'<= 1.3x':>7} | {base:9.2f} s {base / t:7.1f}x"
        )
    print(
        f"(unpack's own input, the packed {packed_n / 1e9:.2f} GB, copies in {t_copy_p:.2f} s: "
        f"unpack = {t_rsu / t_copy_p:.2f}x that copy; not the target's measure)"
    )
    print(
        "targets: >= 5x faster than numpy/torch, <= 1.3x the copy of the larger side (dense). "
        f"packed size {packed_n / n:.4f} of dense"
    )


def fuzz_section(tmp: Path, seconds: float) -> None:
    src = tmp / "fz-src"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g)
    w[torch.rand(24, 40, generator=g) < 0.5] = 0
    save_file(
        {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": torch.ones(40)},
        src / "model.safetensors",
    )
    fmts = ("bitmask", "2:4", "csr")
    bases = []
    for f in fmts:
        ww = w.clone()
        if f == "2:4":
            ww.view(24, 10, 4)[..., 2:] = 0
            save_file({"model.layers.0.mlp.up_proj.weight": ww}, src / "model.safetensors")
        pack(src, tmp / f"fz-{f.replace(':', '')}", f, min_sparsity=0, sync=False)
        bases.append((tmp / f"fz-{f.replace(':', '')}" / "model.safetensors").read_bytes())
    rng = random.Random(0)
    cases = errors = ok = 0
    case_dir = tmp / "fz-case"
    case_dir.mkdir()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            if op < 0.6 and data:
                i = rng.randrange(len(data))
                data[i] = rng.randrange(256)
            elif op < 0.8:
                data = data[: rng.randrange(len(data) + 1)]
            else:
                i = rng.randrange(len(data) + 1)
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        (case_dir / "model.safetensors").write_bytes(bytes(data))
        cases += 1
        try:
            load_packed(case_dir)
            ok += 1
        except BesaError:
            errors += 1
    print(
        f"\n== fuzz (reader, random byte mutations of packed files): {cases} cases in {seconds:.0f} s: "
        f"{errors} BesaError, {ok} loaded (mutations that kept the file valid), 0 crashes"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--layers", type=int, default=4, help="synthetic layers (32 = a full 7B, 13 GB)"
    )
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fuzz-seconds", type=float, default=20)
    ap.add_argument("--skip-model", action="store_true", help="skip the smollm2 size section")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument(
        "--threads", type=int, default=None, help="besa-rs (rayon) and torch threads (default: all)"
    )
    args = ap.parse_args()
    if args.threads:
        # read by rayon when its pool starts (at the first pack)
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="besa-bench-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        if not args.skip_model:
            size_section(tmp)
        throughput_section(tmp, args.layers, args.repeat)
        fuzz_section(tmp, args.fuzz_seconds)


if __name__ == "__main__":
    main()

"""Benchmark of the in-memory API (issue 13): ``besa_rs.compress`` / ``besa_rs.decompress`` on
one 11008 x 4096 matrix at 50% unstructured sparsity, against, in the same run:

- compressed-tensors 0.14's bitmask compressor (``bitmask_compress`` / ``bitmask_decompress``,
  what ``BitmaskCompressor`` runs per weight), bf16;
- ``torch.Tensor.to_sparse_csr`` and back ``.to_dense()``, bf16;
- scipy.sparse ``csr_matrix(a)`` and back ``.toarray()``: scipy has no bfloat16, so it gets a
  float32 copy of the matrix (the cast is not timed).

besa-rs is timed in the same format as each baseline (bitmask for compressed-tensors, CSR for
torch and scipy; f32 CSR next to scipy) and, in the headline rows, its bf16 bitmask (the format
of packed checkpoints) against each baseline's own best. Times are the best of ``--repeat``
runs; ratios = baseline time / besa-rs time. Every result is checked against the input once.
The time of one dense copy (``clone``) is printed as the memory bound of any decoder.

Usage: python benches/memory_codec.py [--threads 2] [--repeat 5] [--rows 11008] [--cols 4096]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None  # free the previous result before the next run
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args()
    # rayon's pool is sized on first use: set its thread count before besa_rs runs anything.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import numpy as np
    import scipy
    import scipy.sparse
    import torch
    from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import (
        bitmask_compress,
        bitmask_decompress,
    )

    import besa_rs

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows, cols = args.rows, args.cols
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    w[torch.rand(rows, cols, generator=g) >= args.density] = 0
    w32 = w.float().numpy()
    nnz = int((w != 0).sum())
    print(
        f"matrix {rows} x {cols} bf16, {100 * (1 - nnz / w.numel()):.2f}% zeros, "
        f"{w.numel() * 2 / 2**20:.1f} MiB dense; threads: besa-rs (rayon) {args.threads}, "
        f"torch {torch.get_num_threads()}, scipy 1 (single-threaded); best of {args.repeat}; "
        f"torch {torch.__version__}, scipy {scipy.__version__}, numpy {np.__version__}"
    )

    rows_out: list[tuple[str, str, float, str, float]] = []

    def row(op: str, ours: str, t_ours: float, theirs: str, t_theirs: float) -> None:
        rows_out.append((op, ours, t_ours, theirs, t_theirs))

    # besa-rs, every format used below
    t_bm_c, bm = best_of(lambda: besa_rs.compress(w, "bitmask"), args.repeat)
    t_bm_d, bm_dense = best_of(lambda: besa_rs.decompress(bm), args.repeat)
    assert torch.equal(bm_dense, w)
    t_csr_c, csr = best_of(lambda: besa_rs.compress(w, "csr"), args.repeat)
    t_csr_d, csr_dense = best_of(lambda: besa_rs.decompress(csr), args.repeat)
    assert torch.equal(csr_dense, w)
    t_csr32_c, csr32 = best_of(lambda: besa_rs.compress(w32, "csr"), args.repeat)
    t_csr32_d, csr32_dense = best_of(lambda: besa_rs.decompress(csr32), args.repeat)
    assert np.array_equal(csr32_dense, w32)

    # compressed-tensors
    t_ct_c, ct = best_of(lambda: bitmask_compress(w), args.repeat)
    t_ct_d, ct_dense = best_of(lambda: bitmask_decompress(ct[0], ct[1], [rows, cols]), args.repeat)
    assert torch.equal(ct_dense, w) and torch.equal(ct[0], bm["compressed"])
    row("compress", "bitmask bf16", t_bm_c, "compressed-tensors bitmask_compress", t_ct_c)
    row("decompress", "bitmask bf16", t_bm_d, "compressed-tensors bitmask_decompress", t_ct_d)

    # torch sparse CSR
    t_th_c, th = best_of(lambda: w.to_sparse_csr(), args.repeat)
    t_th_d, th_dense = best_of(lambda: th.to_dense(), args.repeat)
    assert torch.equal(th_dense, w)
    assert torch.equal(th.crow_indices(), csr["crow_indices"])
    row("compress", "csr bf16", t_csr_c, "torch to_sparse_csr", t_th_c)
    row("decompress", "csr bf16", t_csr_d, "torch sparse_csr.to_dense", t_th_d)

    # scipy.sparse (float32: no bfloat16 in numpy/scipy)
    t_sp_c, sp = best_of(lambda: scipy.sparse.csr_matrix(w32), args.repeat)
    t_sp_d, sp_dense = best_of(lambda: sp.toarray(), args.repeat)
    assert np.array_equal(sp_dense, w32)
    row("compress", "csr f32", t_csr32_c, "scipy csr_matrix (f32)", t_sp_c)
    row("decompress", "csr f32", t_csr32_d, "scipy csr_matrix.toarray (f32)", t_sp_d)

    # headline: besa-rs bf16 bitmask against each baseline as it is
    for name, c, d in [
        ("compressed-tensors bitmask", t_ct_c, t_ct_d),
        ("torch sparse CSR", t_th_c, t_th_d),
        ("scipy CSR (f32)", t_sp_c, t_sp_d),
    ]:
        row("compress", "bitmask bf16", t_bm_c, name, c)
        row("decompress", "bitmask bf16", t_bm_d, name, d)
        row("round trip", "bitmask bf16", t_bm_c + t_bm_d, name, c + d)

    w1, w2, w3 = 10, 13, 38
    print(f"\n{'op':<{w1}} {'besa-rs':<{w2}} {'ms':>8}   {'baseline':<{w3}} {'ms':>9} {'ratio':>8}")
    for i, (op, ours, t1, theirs, t2) in enumerate(rows_out):
        if i == 6:
            print("-- headline: besa-rs bf16 bitmask vs each baseline --")
        print(
            f"{op:<{w1}} {ours:<{w2}} {1e3 * t1:8.1f}   {theirs:<{w3}} {1e3 * t2:9.1f} "
            f"{t2 / t1:7.1f}x"
        )
    t_copy, _ = best_of(lambda: w.clone(), args.repeat)
    t_copy32, _ = best_of(lambda: w32.copy(), args.repeat)
    print(
        f"\nfor scale, one dense copy (fresh output, the memory bound of a decoder): "
        f"bf16 w.clone() {1e3 * t_copy:.1f} ms, f32 numpy copy {1e3 * t_copy32:.1f} ms"
    )
    worst = min(t2 / t1 for *_, t1, _, t2 in rows_out)
    print(f"slowest ratio over all rows: {worst:.1f}x (target: at least 5x)")


if __name__ == "__main__":
    main()

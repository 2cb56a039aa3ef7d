"""GPU check of the fused straight-through mask: build, equivalence, speed and memory.

On a machine with CUDA (about 2 minutes including the extension build):

1. builds the CUDA extension (timed; cached afterwards);
2. checks the kernel against the reference formulation (tests/ste_reference.py) on the GPU:
   hard mask bit-exact, output exactly ``W * hard``, soft mask and logit gradients within 1e-5
   relative, for small odd shapes with ties, every granularity, fp32/fp16/bf16, candidate steps
   0.01 and 0.05, with and without sigmoid smoothing, rows longer than one shared-memory tile,
   int16/int32/int64 ranks, the LLaMA-7B shapes; the weight gradient; bitwise agreement with the
   PyTorch fallback on the same GPU; run-to-run determinism; ``gradcheck`` in fp64;
3. checks the kernels bit for bit (``kernel_bits``): the logit gradient of the extension's
   backward against the documented summation order computed on the CPU
   (``tests/cuda_emu.bucket_sums_in_kernel_order`` and the suffix scan), for whole-row shared
   tiles over 48 KiB (opt-in shared memory), several tiles per row, misaligned views (vector
   path with scalar heads, all-scalar path) and ragged row ends; the forward and the weight
   gradient against ``W * hard``; the prune counts against torch's;
4. prints time and peak memory of reference vs fallback vs kernel at 4096 x 4096 and
   11008 x 4096 (row-wise, 101 candidates, forward + backward).

Results are printed and, when ``$OUT`` is set, written to ``$OUT/gpu_check.json`` and
``$OUT/gpu_check.txt``. Exit status 1 if a check fails, 2 without CUDA.
``--device cpu`` runs part 2 with the fallback only and part 3 on the CPU emulator of the
kernels (tests/cuda_emu): a dry run of the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benches"))

import ste_mask as bench  # noqa: E402
from ste_reference import make_case, reference_ste, relative_error  # noqa: E402

from besa_rs import ste  # noqa: E402
from besa_rs.ste import _ext  # noqa: E402

LINES: list[str] = []
RESULTS: dict = {"checks": [], "failures": [], "bench": []}


def log(msg: str) -> None:
    print(msg, flush=True)
    LINES.append(msg)


def _inputs(rows, cols, groups, step, dtype, device, seed, ties):
    """(weight, order, ranks, logits, candidates, upstream) of one seeded case."""
    w, _, order, ranks, logits, cands, up = make_case(
        rows, cols, groups, step, dtype, device, seed=seed, ties=bool(ties), scale=2.0
    )
    return w, order, ranks, logits, cands, up


def _with_backend(name: str):
    if name == "torch":
        os.environ["BESA_STE_BACKEND"] = "torch"
    else:
        os.environ.pop("BESA_STE_BACKEND", None)


def _ours(weight, ranks, logits, cands, up, smoothing, backend, weight_grad=False):
    _with_backend(backend)
    lg = logits.clone().requires_grad_(True)
    wt = weight.clone().requires_grad_(weight_grad)
    out = ste.ste_mask(wt, ranks, lg, cands, smoothing)
    out.backward(up)
    soft = ste.soft_mask(ranks, logits, cands, smoothing)
    hard = ste.hard_mask(ranks, logits, cands, smoothing)
    _with_backend("default")
    return out.detach(), lg.grad, soft, hard, wt.grad


def check_case(
    name, rows, cols, gran, step, dtype, smoothing, device, seed, ties, rank_dtype, verbose=True
):
    groups = {"row": rows, "layer": 1}.get(gran) or rows // int(gran.split(":")[1])
    weight, order, ranks, logits, cands, up = _inputs(
        rows, cols, groups, step, dtype, device, seed, ties
    )
    ranks = ranks.to(rank_dtype)
    ref_lg = logits.clone().requires_grad_(True)
    ref_out, ref_hard, ref_soft = reference_ste(weight, order, ref_lg, cands, smoothing)
    (ref_out * up.float()).sum().backward()
    backend = ste.backend(device)
    out, grad, soft, hard, _ = _ours(weight, ranks, logits, cands, up, smoothing, backend)
    problems = []
    if not torch.equal(hard, ref_hard.bool()):
        problems.append(f"hard mask differs in {(hard != ref_hard.bool()).sum().item()} entries")
    if not torch.equal(out, weight * hard.to(dtype)):
        problems.append("output != W * hard")
    e_soft = relative_error(soft, ref_soft)
    e_grad = relative_error(grad, ref_lg.grad)
    if e_soft > 1e-5:
        problems.append(f"soft mask rel err {e_soft:.2e}")
    if e_grad > 1e-5:
        problems.append(f"logit grad rel err {e_grad:.2e}")
    extra = ""
    if backend == "cuda-ext":
        # same GPU, PyTorch fallback: bitwise-equal forward, gradients equal to fp32 rounding
        f_out, f_grad, _, _, _ = _ours(weight, ranks, logits, cands, up, smoothing, "torch")
        same_bits = torch.equal(
            out.view(torch.int16 if out.element_size() == 2 else torch.int32),
            f_out.view(torch.int16 if f_out.element_size() == 2 else torch.int32),
        )
        if not same_bits:
            problems.append("forward bits differ from the fallback")
        e_fb = relative_error(grad, f_grad)
        if e_fb > 1e-5:
            problems.append(f"grad vs fallback rel err {e_fb:.2e}")
        # determinism: the backward kernel has no atomics
        _, grad2, _, _, _ = _ours(weight, ranks, logits, cands, up, smoothing, backend)
        if not torch.equal(grad, grad2):
            problems.append("backward not deterministic")
        extra = f" vs-fallback {e_fb:.1e}"
    status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    if verbose or problems:
        log(f"  {name:<44} soft {e_soft:.1e} grad {e_grad:.1e}{extra} [{backend}] {status}")
    RESULTS["checks"].append(
        {"case": name, "soft_rel": e_soft, "grad_rel": e_grad, "ok": not problems}
    )
    if problems:
        RESULTS["failures"].append(f"{name}: {status}")
    return max(e_soft, e_grad)


def equivalence(device: str) -> None:
    log(f"equivalence with the reference on {device} (backend {ste.backend(device)}):")
    seed = 0
    for rows, cols in [(1, 7), (5, 13), (12, 100), (9, 1001), (6, 4097)]:
        n_before, worst = len(RESULTS["checks"]), 0.0
        for gran in ["row", "layer"] + (["block:3"] if rows % 3 == 0 else []):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for step in (0.01, 0.05):
                    for smoothing in (True, False):
                        seed += 1
                        name = (
                            f"{rows}x{cols} {gran} {str(dtype)[6:]} step {step}"
                            f"{' smooth' if smoothing else ' plain'}"
                        )
                        err = check_case(
                            name,
                            rows,
                            cols,
                            gran,
                            step,
                            dtype,
                            smoothing,
                            device,
                            seed,
                            seed % 2 == 0,
                            torch.int32,
                            verbose=False,
                        )
                        worst = max(worst, err)
        n = len(RESULTS["checks"]) - n_before
        log(
            f"  {rows}x{cols}: {n} cases (row/block/layer x fp32/fp16/bf16 x step 0.01/0.05 x"
            f" smoothing on/off), worst relative error {worst:.1e}"
        )
    # rows longer than one shared-memory tile (12k fp32 / 6k fp64 slots), rank dtypes
    for rows, cols, dtype, rdt in [
        (3, 30011, torch.float32, torch.int32),
        (4, 13000, torch.bfloat16, torch.int64),
        (8, 2000, torch.float16, torch.int16),
        (2, 70001, torch.float32, torch.int64),
    ]:
        seed += 1
        check_case(
            f"{rows}x{cols} row {str(dtype)[6:]} ranks {str(rdt)[6:]}",
            rows,
            cols,
            "row",
            0.01,
            dtype,
            True,
            device,
            seed,
            True,
            rdt,
        )
    # LLaMA-7B shapes
    for rows, cols, gran, dtype in [
        (4096, 4096, "row", torch.float32),
        (11008, 4096, "row", torch.bfloat16),
        (4096, 11008, "block:8", torch.float16),
        (4096, 4096, "layer", torch.float32),
    ]:
        seed += 1
        check_case(
            f"{rows}x{cols} {gran} {str(dtype)[6:]} (LLaMA-7B)",
            rows,
            cols,
            gran,
            0.01,
            dtype,
            True,
            device,
            seed,
            False,
            torch.int32,
        )
    # weight gradient = g * hard, bitwise
    weight, _, ranks, logits, cands, up = _inputs(64, 1000, 64, 0.01, torch.bfloat16, device, 99, 1)
    _, _, _, hard, gw = _ours(weight, ranks, logits, cands, up, True, ste.backend(device), True)
    ok = torch.equal(gw, up * hard.to(up.dtype))
    log(f"  weight gradient == g * hard: {'ok' if ok else 'FAIL'}")
    if not ok:
        RESULTS["failures"].append("weight gradient")
    # gradcheck in fp64 (checks the backward kernel through the soft op)
    weight, _, ranks, logits, _, _ = _inputs(6, 11, 2, 0.25, torch.float64, device, 5, 0)
    cands = ste.candidate_sparsities(0.25).double().to(device)
    lg = logits.double().requires_grad_(True)
    wt = weight.requires_grad_(True)
    try:
        ok = torch.autograd.gradcheck(
            lambda a, b: ste.soft_mask(ranks, a, cands, True, weight=b),
            (lg, wt),
            eps=1e-6,
            atol=1e-7,
            rtol=1e-5,
        )
    except Exception as exc:  # gradcheck raises on mismatch
        ok = False
        log(f"  gradcheck error: {exc}")
    log(f"  gradcheck fp64 (block of 3 rows): {'ok' if ok else 'FAIL'}")
    if not ok:
        RESULTS["failures"].append("gradcheck")


def _at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``x`` starting ``offset`` elements into its storage."""
    buf = torch.zeros(x.numel() + offset, dtype=x.dtype, device=x.device)
    view = buf[offset:].view(x.shape)
    view.copy_(x)
    return view


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def kernel_bits(device: str) -> None:
    """The kernels' results bit for bit against their documented definition (CPU model)."""
    from cuda_emu import EmulatedExtension, bucket_sums_in_kernel_order, load

    from besa_rs.ste import _fallback

    ext = _ext.build() if device == "cuda" else EmulatedExtension(load())
    log(f"kernels bit for bit on {device} ({'CUDA' if device == 'cuda' else 'CPU emulator'}):")
    old_det = _fallback.FORCE_DETERMINISTIC
    _fallback.FORCE_DETERMINISTIC = True  # the suffix scan the kernel reproduces
    try:
        cases = [
            # rows, cols, weight dtype, rank dtype, fp64 accumulation, (g, w, ranks) offsets, step
            (4, 1003, torch.float32, torch.int16, False, (0, 0, 0), 0.01),
            (3, 4097, torch.bfloat16, torch.int16, False, (1, 1, 1), 0.01),
            (3, 2000, torch.float32, torch.int16, False, (1, 0, 3), 0.01),  # all scalar
            (2, 30011, torch.float32, torch.int32, False, (0, 0, 0), 0.01),  # 117 KiB tile
            (2, 30011, torch.float64, torch.int64, True, (0, 0, 0), 0.01),  # 2 tiles per row
            (2, 70001, torch.float32, torch.int64, False, (0, 0, 0), 0.01),  # 2 tiles per row
            (2, 9500, torch.float16, torch.int32, False, (0, 0, 0), 0.001),  # 1001 candidates
        ]
        for rows, cols, dtype, rdt, acc_double, offs, step in cases:
            name = f"{rows}x{cols} {str(dtype)[6:]} ranks {str(rdt)[6:]} offsets {offs}"
            gen = torch.Generator().manual_seed(cols)
            w = torch.randn(rows, cols, generator=gen).to(dtype)
            g = torch.randn(rows, cols, generator=gen).to(dtype)
            ranks = ste.row_ranks(torch.rand(rows, cols, generator=gen)).to(rdt)
            t = ste.candidate_prune_counts(ste.candidate_sparsities(step), cols)
            n = torch.randint(0, cols + 1, (rows,), generator=gen)
            acc = torch.float64 if acc_double else torch.float32
            hist = bucket_sums_in_kernel_order(g, w, ranks, t, acc)
            want_grad = -_fallback.suffix_sums(hist)[:, 1:]
            want_out = w * (ranks.long() >= n[:, None]).to(dtype)
            dg, dw, dr = (
                _at_offset(g.to(device), offs[0]),
                _at_offset(w.to(device), offs[1]),
                _at_offset(ranks.to(device), offs[2]),
            )
            nd, td = n.to(device), t.to(device)
            got_grad, got_gw = ext.backward(dg, dw, dr, nd, td, 1, True, acc_double)
            got_out = ext.forward(dw, dr, nd)
            problems = []
            if not torch.equal(_bits(got_grad.cpu()), _bits(want_grad)):
                diff = (got_grad.cpu() != want_grad).sum().item()
                problems.append(f"logit gradient differs in {diff} of {want_grad.numel()} bits")
            if not torch.equal(_bits(got_out.cpu()), _bits(want_out)):
                problems.append("forward != W * hard (bits)")
            want_gw = g * (ranks.long() >= n[:, None]).to(dtype)
            if not torch.equal(_bits(got_gw.cpu()), _bits(want_gw)):
                problems.append("weight gradient != g * hard (bits)")
            status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            log(f"  {name:<52} {status}")
            RESULTS["checks"].append({"case": "bits " + name, "ok": not problems})
            if problems:
                RESULTS["failures"].append(f"bits {name}: {status}")
        # prune counts: the kernel against torch's floor / clamp / int64 on the same device
        for adt in (torch.float32, torch.float64):
            alpha = torch.rand(301, generator=torch.Generator().manual_seed(7), dtype=adt)
            alpha[:4] = torch.tensor([0.0, 1.0, 0.29, 1.5], dtype=adt)
            alpha = alpha.to(device)
            got = ext.prune_rows(alpha, 301 * 2, 11008)
            want = ste.prune_counts(alpha, 11008).repeat_interleave(2)
            ok = torch.equal(got, want)
            log(f"  prune counts ({str(adt)[6:]} alpha) == torch's: {'ok' if ok else 'FAIL'}")
            RESULTS["checks"].append({"case": f"prune counts {adt}", "ok": ok})
            if not ok:
                RESULTS["failures"].append(f"prune counts {adt}")
    finally:
        _fallback.FORCE_DETERMINISTIC = old_det


def benchmarks() -> None:
    for rows, cols in [(4096, 4096), (11008, 4096)]:
        results = []
        for v in bench.VARIANTS_GPU:
            results.append(bench.measure(v, rows, cols, rows, 0.01, "cuda", 1))
            torch.cuda.empty_cache()
        times = bench.time_interleaved(bench.VARIANTS_GPU, rows, cols, rows, 0.01, "cuda", 10)
        for r in results:
            ts = sorted(times[r["variant"]])
            r["best_s"], r["median_s"], r["times_s"] = ts[0], ts[len(ts) // 2], ts
        title = (
            f"ste_mask forward+backward, {rows} x {cols}, row-wise, 101 candidates, fp32, "
            f"{torch.cuda.get_device_name()}"
        )
        for line in bench.report(results, title):
            log(line)
        RESULTS["bench"].append({"title": title, "results": results})
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    code = 0
    try:
        log(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
        if args.device == "cuda":
            if not torch.cuda.is_available():
                log("error: CUDA is not available (use --device cpu for a dry run)")
                return 2
            log(f"device: {torch.cuda.get_device_name()}")
            t0 = time.perf_counter()
            mod = _ext.build(verbose=False)
            RESULTS["build_s"] = time.perf_counter() - t0
            log(f"extension built/loaded in {RESULTS['build_s']:.1f} s: {mod.__file__}")
            if ste.backend("cuda") != "cuda-ext":
                log("FAIL: backend('cuda') is not cuda-ext")
                RESULTS["failures"].append("backend")
        equivalence(args.device)
        kernel_bits(args.device)
        if args.device == "cuda":
            benchmarks()
    except Exception:
        log("FAIL: exception\n" + traceback.format_exc())
        RESULTS["failures"].append("exception")
    finally:
        RESULTS["total_s"] = time.perf_counter() - t_start
        n_fail = len(RESULTS["failures"])
        log(
            f"gpu_check: {len(RESULTS['checks'])} cases, {n_fail} failures, "
            f"{RESULTS['total_s']:.1f} s total"
        )
        code = 1 if n_fail else code
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
            (Path(out) / "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""Scale rehearsal: BESA row-wise on one LLaMA-7B-shaped block on this machine's CPU.

    .venv/bin/python benches/scale.py [--nsamples 2] [--seqlen 2048] [--dtypes float32,bfloat16]
        [--threads 1] [--json PATH]

One ``LlamaDecoderLayer`` with LLaMA-7B's shape (hidden 4096, FFN 11008, 32 heads, SDPA
attention), random weights (normal, std 0.02 as the model's initializer), ``--nsamples`` random
inputs of ``--seqlen`` tokens, pruned to 50% by the default BESA settings (row-wise, AdamW,
step budget). Each dtype runs in its own process and prints:

* seconds per optimisation step (forward + backward of the block on one sequence + the mask op
  on all 202 M weights) and for the whole block;
* peak RSS of the pruning (its process's peak minus the peak before the block was built)
  against the memory formula of docs/pruning.md (``memory_formula``), and their ratio;
* the fraction of the gradient reaching the block output that underflows to zero when it is
  held in float16 (entries non-zero in float32, zero in float16), without and with loss scaling (the scaler's initial scale 65536), for inputs of
  channel scale 1 and 4, with the relative error of the pruned block on them.

float16 itself cannot run here: the CPU has no float16 GEMM (the bench measures its speed and
says how long one step would take).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

HIDDEN, FFN, HEADS = 4096, 11008, 32
CANDIDATES = 101


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_formula(
    params: int,
    rows: int,
    nsamples: int,
    seqlen: int,
    hidden: int,
    ffn: int,
    bytes_w: int,
    bytes_a: int,
    largest_layer: int,
) -> dict[str, float]:
    """docs/pruning.md, "Memory" (BESA row-wise, caches on the compute device), in bytes: the
    optimisation's peak, or the ranking's (before it, not at the same time) if larger."""
    parts = {
        # int16 ranks (LLaMA widths: < 32768 input features); the masked weight and its
        # gradient of one layer at a time (made in the layer's forward, again in its backward)
        "weights, int16 ranks": params * (bytes_w + 2),
        "one layer's masked weight + grad": largest_layer * 2 * bytes_w,
        "caches (inputs, targets, next inputs)": 3 * nsamples * seqlen * hidden * bytes_a,
        "autograd activations (one sequence)": seqlen * (10 * hidden + 4 * ffn) * 4,
        "logits + AdamW moments": rows * CANDIDATES * 4 * 3,
    }
    optimisation = sum(parts.values())
    # one chunk of 2^22 importance values sorted at a time: fp32 values twice + int64 indices
    ranking = (
        params * (bytes_w + 2) + (1 << 22) * 16 + parts["caches (inputs, targets, next inputs)"]
    )
    parts["ranking phase (weights, ranks, one chunk's sort)"] = ranking
    parts["total"] = max(optimisation, ranking)
    return parts


def gemm_gflops(dtype: Any, n: int = 256) -> float:
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    t = time.perf_counter()
    a @ b
    dt = time.perf_counter() - t
    return 2 * n**3 / dt / 1e9


def run_one(dtype_name: str, nsamples: int, seqlen: int, threads: int) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from besa_rs.models import parse_dtype
    from besa_rs.pruning import PruneConfig
    from besa_rs.pruning.adapters import block_linears
    from besa_rs.pruning.besa import output_grad_zero_fraction, prune_block_besa
    from besa_rs.pruning.besa import relative_reconstruction as rel_rec
    from besa_rs.pruning.context import BlockContext

    torch.set_num_threads(threads)
    dtype = parse_dtype(dtype_name)
    base_mb = rss_peak_mb()
    cfg_m = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        num_hidden_layers=1,
        max_position_embeddings=seqlen,
    )
    cfg_m._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg_m, layer_idx=0).eval()
    with torch.no_grad():
        for lin in block_linears(block).values():
            lin.weight.normal_(0.0, cfg_m.initializer_range)
    block = block.to(dtype)
    linears = block_linears(block)
    params = sum(lin.weight.numel() for lin in linears.values())
    rows = sum(lin.weight.shape[0] for lin in linears.values())
    largest = max(lin.weight.numel() for lin in linears.values())
    pos = torch.arange(seqlen).unsqueeze(0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, seqlen, HIDDEN, generator=g).to(dtype) for _ in range(nsamples)]
    cos, sin = LlamaRotaryEmbedding(cfg_m)(xs[0].float(), pos)
    kwargs = {"position_embeddings": (cos.to(dtype), sin.to(dtype)), "position_ids": pos}

    # dense outputs on one sample at channel scale 1 and 4 (for the float16 gradient check)
    probe = {s: xs[0].float().mul(s).to(dtype) for s in (1.0, 4.0)}
    with torch.no_grad():
        dense_out = {s: block(x, **kwargs).float() for s, x in probe.items()}

    cfg = PruneConfig(progress=False).validate()
    ctx = BlockContext(
        index=0,
        block=block,
        linears=linears,
        args=(),
        kwargs=kwargs,
        device=torch.device("cpu"),
        xs=xs,
        xd=None,
        cfg=cfg,
        cache_device=torch.device("cpu"),
        cache_dtype=dtype,
        compute_dtype=dtype,
    )
    t0 = time.perf_counter()
    rep = prune_block_besa(ctx)
    nxt = ctx.run_all(xs)  # the next block's inputs, as the sequential driver makes them
    block_s = time.perf_counter() - t0
    peak_mb = rss_peak_mb() - base_mb
    del nxt

    grads: dict[str, Any] = {}
    with torch.no_grad():
        pruned_out = {s: block(x, **kwargs).float() for s, x in probe.items()}
    for s in probe:
        y, y_hat = dense_out[s], pruned_out[s]
        grads[f"sigma={s:g}"] = {
            "relative_error": float(rel_rec(y, y_hat)),
            "zero_fp16_unscaled": output_grad_zero_fraction(y, y_hat, 1.0, torch.float16),
            "zero_fp16_scaled": output_grad_zero_fraction(
                y, y_hat, cfg.loss_scale_init, torch.float16
            ),
        }
    b_w = torch.empty((), dtype=dtype).element_size()
    formula = memory_formula(params, rows, nsamples, seqlen, HIDDEN, FFN, b_w, b_w, largest)
    return {
        "dtype": dtype_name,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "threads": threads,
        "params": params,
        "steps": rep["steps"],
        "seconds_per_step": rep["optimisation_seconds"] / max(rep["steps"], 1),
        "block_seconds": block_s,
        "loss": rep["loss"],
        "peak_rss_mb": peak_mb,
        "formula_mb": {k: v / 2**20 for k, v in formula.items()},
        "ratio": peak_mb / (formula["total"] / 2**20),
        "fp16_output_grad": grads,
        "realised_sparsity": rep["layers"][0]["realised_sparsity"],
        "load_avg": os.getloadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        res = run_one(args.one, args.nsamples, args.seqlen, args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"LLaMA-7B-shaped block (hidden {HIDDEN}, FFN {FFN}, {HEADS} heads), random weights; "
        f"{args.nsamples} x {args.seqlen} tokens; BESA row-wise defaults; "
        f"{args.threads} torch thread(s), {os.cpu_count()} cpus",
        flush=True,
    )
    results = []
    for dt in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        cmd = [sys.executable, __file__, "--one", dt, "--nsamples", str(args.nsamples)]
        cmd += ["--seqlen", str(args.seqlen), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = proc.stderr.strip().splitlines()
            print(f"{dt}: FAILED: {err[-1] if err else proc.returncode}", flush=True)
            continue
        r = json.loads(line[7:])
        results.append(r)
        f = r["formula_mb"]
        print(
            f"{dt:<9} {r['seconds_per_step']:7.1f} s/step ({r['steps']} steps), block "
            f"{r['block_seconds']:.0f} s; peak RSS {r['peak_rss_mb']:.0f} MB vs formula "
            f"{f['total']:.0f} MB (ratio {r['ratio']:.2f}, {'within' if abs(r['ratio'] - 1) <= 0.2 else 'OUTSIDE'} 20%); "
            f"load avg {r['load_avg'][0]:.1f}",
            flush=True,
        )
        for k, v in f.items():
            if k != "total":
                print(f"    formula: {k:<42} {v:8.0f} MB", flush=True)
        for s, gr in r["fp16_output_grad"].items():
            print(
                f"    fp16 output gradient, {s}: relative error {gr['relative_error']:.3f}; "
                f"underflow to zero {100 * gr['zero_fp16_unscaled']:.1f}% unscaled, "
                f"{100 * gr['zero_fp16_scaled']:.2f}% with loss scale 65536",
                flush=True,
            )
    gf = gemm_gflops(torch.float16)
    gf32 = gemm_gflops(torch.float32)
    print(
        f"float16: not run; this CPU's float16 GEMM runs at {gf:.1f} GFLOP/s (float32 {gf32:.0f}), "
        f"so one step (~{6 * args.seqlen * 202e6 / 1e12:.1f} TFLOP) would take about "
        f"{6 * args.seqlen * 202e6 / gf / 1e9 / 3600:.1f} h",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

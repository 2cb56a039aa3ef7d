"""BESA and Wanda on one LLaMA-7B- or LLaMA-2-70B-shaped block on a GPU: time, memory, error.

    python benches/gpu_block.py [--shapes 7b,70b] [--runs 7b:float32:32,7b:bfloat16:32,...]
        [--methods wanda,besa] [--seqlen 2048] [--json PATH]

A one-block ``LlamaForCausalLM`` with the published shape (7B: hidden 4096, FFN 11008, 32 heads;
70B: hidden 8192, FFN 28672, 64 heads, 8 key/value heads), random weights (normal, std 0.02,
seeded: every run of a shape prunes the same weights), random calibration tokens. Each run
prunes the block with ``besa_rs.prune(..., device="cuda")`` at 50% (default BESA settings:
row-wise, AdamW, one sequence per step, one epoch) with the model in the run's dtype (fp16
runs with dynamic loss scaling, bf16 under autocast) and prints:

* seconds for the block (the engine's own per-block time: statistics pass, the steps, the hard
  masks, the next block's inputs) and per calibration sequence, and the run's wall time;
* peak GPU memory allocated during the pruning;
* the realised sparsity and, for BESA, the first and last step's loss and the final loss scale;
* ``METHOD-wN`` runs: the same with N-bit weights (group 128): Wanda then round-to-nearest
  (Joint-Wanda), BESA with learned masks and clipping (joint);
* the relative error of the block's output change on 4 held-out sequences,
  ``||(y_pruned - x) - (y_dense - x)|| / ||y_dense - x||`` (x the block input), computed in
  float32 from the outputs in the model's dtype: BESA must beat Wanda in every dtype, and the
  three dtypes must agree.

Results go to ``--json`` (default ``$OUT/gpu_block.json`` when ``$OUT`` is set). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

SHAPES: dict[str, dict[str, int]] = {
    "7b": {"hidden": 4096, "ffn": 11008, "heads": 32, "kv": 32},
    "70b": {"hidden": 8192, "ffn": 28672, "heads": 64, "kv": 8},
}
DEFAULT_RUNS = (
    "7b:float32:32,7b:bfloat16:32,7b:float16:32,70b:bfloat16:128,70b:float16:32,"
    "7b:bfloat16:32:wanda-w4+besa-w4,7b:float16:32:wanda-w4+besa-w4"
)
VOCAB = 32000
HELD_OUT = 4


def build(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    """The one-block model, made on the GPU (fast initialisation) and moved to the CPU, where
    the engine keeps the model while it moves the block to the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        num_hidden_layers=1,
        max_position_embeddings=4096,
        initializer_range=0.02,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model.to("cpu")


@torch.no_grad()
def block_io(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the decoder block on ``tokens``, in float32 on the GPU."""
    seen: dict[str, torch.Tensor] = {}
    layer = model.model.layers[0]

    def hook(_mod: Any, args: Any, kwargs: Any, out: Any) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        seen["x"] = x.float()
        seen["y"] = (out[0] if isinstance(out, tuple) else out).float()

    h = layer.register_forward_hook(hook, with_kwargs=True)
    model.to("cuda")
    try:
        model(tokens.cuda())
    finally:
        h.remove()
        model.to("cpu")
    return seen["x"], seen["y"]


def one_run(shape: str, dtype_name: str, nsamples: int, method: str, seqlen: int) -> dict:
    import besa_rs
    from besa_rs.pruning.config import PruneConfig

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(0, VOCAB, (nsamples + HELD_OUT, seqlen), generator=gen)
    calib, held = toks[:nsamples], toks[nsamples:]
    model = build(shape, dtype)
    x, y_dense = block_io(model, held)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    name, _, bits = method.partition("-w")
    quant = {"wbits": int(bits)} if bits else {}
    rep = besa_rs.prune(
        model, calib, PruneConfig(method=name, device="cuda", progress=False, **quant)
    )
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    _, y = block_io(model, held)
    err = float((y - y_dense).norm() / (y_dense - x).norm())
    b = rep["blocks"][0]
    out: dict[str, Any] = {
        "shape": shape,
        "dtype": dtype_name,
        "method": method,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "block_s": b["seconds"],
        "per_sequence_s": b["seconds"] / nsamples,
        "wall_s": wall,
        "peak_gpu_gb": peak / 1e9,
        "realised_sparsity": rep["totals"]["realised_sparsity"],
        "rel_err": err,
    }
    losses = b.get("loss") or []
    if losses:
        out["loss_first"], out["loss_last"] = float(losses[0]), float(losses[-1])
        out["optimisation_s"] = b["optimisation_seconds"]
        out["skipped_steps"] = b["skipped_steps"]
    if b.get("loss_scale") is not None:
        out["loss_scale"] = b["loss_scale"]
    del model
    torch.cuda.empty_cache()
    return out


def fmt(r: dict) -> str:
    extra = ""
    if "loss_first" in r:
        extra = (
            f"  steps {r['optimisation_s']:.2f} s  loss {r['loss_first']:.4g} -> "
            f"{r['loss_last']:.4g}  skipped {r['skipped_steps']}"
        )
    if "loss_scale" in r:
        extra += f"  scale {r['loss_scale']:g}"
    return (
        f"{r['shape']:>4} {r['dtype']:<9} {r['method']:<6} n={r['nsamples']:<4}"
        f" block {r['block_s']:8.2f} s  {r['per_sequence_s'] * 1e3:8.1f} ms/seq"
        f"  wall {r['wall_s']:7.2f} s  peak {r['peak_gpu_gb']:6.2f} GB"
        f"  sparsity {r['realised_sparsity']:.4f}  rel.err {r['rel_err']:.4f}{extra}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--runs",
        default=DEFAULT_RUNS,
        help="shape:dtype:nsamples[:method+method...],... (methods default to --methods; "
        "METHOD-wN: joint with N-bit weights, group 128)",
    )
    ap.add_argument("--methods", default="wanda,besa")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_block: needs a CUDA device", file=sys.stderr)
        return 2
    path = a.json or (
        os.path.join(os.environ["OUT"], "gpu_block.json") if "OUT" in os.environ else None
    )
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    results: list[dict] = []
    status = 0
    for spec in a.runs.split(","):
        shape, dtype_name, n, *meth = spec.split(":")
        for method in meth[0].split("+") if meth else a.methods.split(","):
            try:
                r = one_run(shape, dtype_name, int(n), method, a.seqlen)
                print(fmt(r), flush=True)
                results.append(r)
            except Exception as e:  # keep going: the other runs still say something
                status = 1
                print(f"{shape} {dtype_name} {method}: FAILED {type(e).__name__}: {e}", flush=True)
                results.append(
                    {"shape": shape, "dtype": dtype_name, "method": method, "error": repr(e)}
                )
                torch.cuda.empty_cache()
            if path:
                Path(path).write_text(json.dumps(results, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Peak host memory of ``besa-rs prune``: in-memory vs streamed block loading (issue 12).

Each run is a child process (``besa-rs prune ... --load MODE``, one thread); its peak resident
set size comes from ``os.wait4`` (``ru_maxrss`` of that child alone). Printed next to the
formula of streamed loading: one block's weights + the embeddings read for the capture + the
activation caches + 1 GB of runtime (Python, torch, transformers), with the numbers filled in.

1. The default model (smollm2-135m, float32, tied embeddings), Wanda, in memory and streamed.
2. A synthetic LLaMA-7B-shaped checkpoint written by this script into a temporary directory:
   4 blocks, hidden 4096, intermediate 11008, 32 heads, vocabulary 32000, bfloat16, random
   weights, one shard per block (plus one for the embeddings, one for the norm and head, and an
   index). Pruned streamed in bfloat16 with Wanda (4 blocks) and with BESA (one block,
   ``--blocks 1``; steps = nsamples x epochs / batch size). Its in-memory run is printed for
   comparison unless ``--skip-7b-in-memory``.

Every row says whether the peak met the formula ("met" / "not met", with the excess).
``--stages`` also prints, for the synthetic runs, the peak RSS of each stage of the run (load and
capture, statistics, ranks, optimisation, hard masks, write), each measured from the RSS at the
stage's start (``/proc/self/clear_refs`` resets the high-water mark at every stage boundary).

``--compare-ranks`` also runs BESA on the synthetic checkpoint with int16 ranks (its path on
the CPU before bucket codes, ``besa.COMPACT_CODES = False``) for a side-by-side row.

Usage: python benches/memory.py [--nsamples 4] [--seqlen 128] [--skip-default] [--skip-7b]
       [--stages] [--synthetic-methods wanda,besa] [--compare-ranks]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
RUNTIME = 1.0 * GB  # the formula's allowance for Python + torch + transformers

SHAPES_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    num_hidden_layers=4,
)


#: runs ``besa_rs.cli.main`` and writes the process's own peak RSS (VmHWM of its address space)
#: to $BESA_MEM_OUT at exit. ``ru_maxrss`` of a child cannot be used: Linux carries the
#: parent's resident size at fork (up to the exec) into the child's maximum. With
#: $BESA_MEM_STAGES it also writes there one line per stage: label, peak RSS during the stage,
#: RSS at its start (stage boundaries: wrappers around the pruning functions named below).
_WRAPPER = """
import atexit, os, sys
PEAK = 0
def _status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(v.split()[0]) * 1024
    return d
def _hwm():
    st = _status()
    if os.environ.get("BESA_MEM_STAGES"):
        _mark("write output, exit")
    open(os.environ["BESA_MEM_OUT"], "w").write(str(max(PEAK, st["VmHWM"]) // 1024))
atexit.register(_hwm)
if sys.argv[1:] == ["--imports-only"]:
    import torch, transformers, besa_rs.pruning.streaming, besa_rs.pruning.sequential
    sys.exit(0)
if os.environ.get("BESA_MEM_STAGES"):
    STAGES, START = [], [_status()["VmRSS"]]
    def _mark(label):
        global PEAK
        st = _status()
        PEAK = max(PEAK, st["VmHWM"])
        STAGES.append((label, st["VmHWM"], START[0]))
        open(os.environ["BESA_MEM_STAGES"], "w").write(
            "".join(f"{a}\\t{b}\\t{c}\\n" for a, b, c in STAGES))
        try:  # the high-water mark restarts from the current RSS
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        START[0] = _status()["VmRSS"]
    def _wrap(obj, name, before, after):
        f = getattr(obj, name, None)
        if f is None:  # an older besa_rs (the bench measures before and after a change)
            return
        def g(*a, **k):
            if before:
                _mark(before)
            out = f(*a, **k)
            _mark(after)
            return out
        setattr(obj, name, g)
    from besa_rs import ste
    from besa_rs.pruning import besa, context, distributed
    _wrap(context.BlockContext, "run_with_stats", "load block, capture, dense chain", "statistics, targets")
    _wrap(ste, "row_ranks_by_chunks", None, "ranks of one layer")
    _wrap(ste, "row_ranks", None, "ranks of one layer")
    _wrap(besa, "optimise_block", "logits, clipping", "optimisation")
    _wrap(distributed, "sync_block", "masks, weights updated", "(sync)")
if os.environ.get("BESA_MEM_RANKS"):  # the int16 ranks' path, for comparison
    from besa_rs.pruning import besa as _besa
    _besa.COMPACT_CODES = False
from besa_rs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_child(
    cmd: list[str], log: Path, stages: bool = False, ranks: bool = False
) -> tuple[int, int, float]:
    """Runs ``besa-rs`` arguments ``cmd`` in a child on one thread; returns (exit status, the
    child's peak RSS in bytes, seconds). With ``stages`` the per-stage peaks are printed; with
    ``ranks`` BESA keeps int16 ranks on the CPU (the path before bucket codes)."""
    hwm = log.with_suffix(".hwm")
    env = {
        **os.environ,
        **({"BESA_MEM_RANKS": "1"} if ranks else {}),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "BESA_MEM_OUT": str(hwm),
    }
    if stages:
        env["BESA_MEM_STAGES"] = str(log.with_suffix(".stages"))
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        rc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *cmd], env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    secs = time.perf_counter() - t0
    peak = int(hwm.read_text()) * 1024 if hwm.is_file() else 0
    if stages and log.with_suffix(".stages").is_file():
        print_stages(log.with_suffix(".stages").read_text())
    return rc, peak, secs


def print_stages(text: str) -> None:
    """One line per stage: its highest peak RSS and its largest growth over the RSS at its
    start, over all its occurrences (e.g. the ranks of each layer, the masks of each block)."""
    merged: dict[str, list[int]] = {}
    for line in text.splitlines():
        label, peak, start = line.split("\t")
        m = merged.setdefault(label, [0, 0, 0])
        m[0] = max(m[0], int(peak))
        m[1] = max(m[1], int(peak) - int(start))
        m[2] += 1
    for label, (peak, growth, n) in merged.items():
        times = f" (x{n})" if n > 1 else ""
        print(
            f"    {label + times:<42} peak {gb(peak)}  (+{gb(growth)} over its start)", flush=True
        )


def formula(terms: list[tuple[str, float]]) -> tuple[float, str]:
    """The bound and its terms written out: ``block 0.40 + embeddings 0.26 + ... = 1.68 GB``."""
    bound = sum(v for _, v in terms)
    return bound, " + ".join(f"{k} {v / GB:.2f}" for k, v in terms) + f" = {gb(bound)}"


def verdict(peak: float, bound: float) -> str:
    return "met" if peak <= bound else f"not met (+{gb(peak - bound)})"


def gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


# ---------------------------------------------------------------------------------------------
def char_tokenizer(vocab_size: int):
    """A character-level fast tokenizer (ids well below ``vocab_size``) for the synthetic model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    assert len(vocab) < vocab_size
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def write_7b_shaped(d: Path, seed: int = 0) -> dict[str, int]:
    """The synthetic checkpoint, one block at a time (this process never holds two blocks)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d.mkdir(parents=True)
    cfg = LlamaConfig(**SHAPES_7B, max_position_embeddings=2048, tie_word_embeddings=False)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    char_tokenizer(cfg.vocab_size).save_pretrained(d)
    g = torch.Generator().manual_seed(seed)
    h, f, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def shard(k: int) -> dict[str, torch.Tensor]:
        if k == 0:
            return {"model.embed_tokens.weight": rand(v, h)}
        if k == n + 1:
            return {
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                "lm_head.weight": rand(v, h),
            }
        p = f"model.layers.{k - 1}."
        return {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            **{p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"},
            p + "mlp.gate_proj.weight": rand(f, h),
            p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
        }

    weight_map, total = {}, 0
    for k in range(n + 2):
        sd = shard(k)
        name = f"model-{k + 1:05d}-of-{n + 2:05d}.safetensors"
        save_file(sd, str(d / name), metadata={"format": "pt"})
        for t_name, t in sd.items():
            weight_map[t_name] = name
            total += t.numel() * t.element_size()
        del sd
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    block = 4 * h * h + 3 * h * f
    return {"block_bytes": 2 * (block + 2 * h), "embed_bytes": 2 * v * h, "hidden": h}


def calib_text(path: Path, chars: int = 200_000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = [
        "state",
        "union",
        "congress",
        "nation",
        "people",
        "economy",
        "work",
        "future",
        "the",
        "of",
    ]
    path.write_text(" ".join(rng.choice(words) for _ in range(chars // 6)))
    return path


# ---------------------------------------------------------------------------------------------
def prune_cmd(
    model: str | Path, out: Path, calib: str, args: argparse.Namespace, *extra: str
) -> list[str]:
    return [
        "prune", str(model), "--out", str(out),
        "--calib", calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--quiet", "--overwrite", *extra,
    ]  # fmt: skip


def runtime_row(tmp: Path) -> int:
    rc, peak, _ = run_child(["--imports-only"], tmp / "runtime.log")
    assert rc == 0
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--default-nsamples", type=int, default=8, help="calibration for smollm2-135m")
    ap.add_argument("--default-seqlen", type=int, default=256)
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-7b-in-memory", action="store_true")
    ap.add_argument("--tmp", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--stages", action="store_true", help="per-stage peaks of the synthetic runs")
    ap.add_argument(
        "--compare-ranks",
        action="store_true",
        help="also run BESA on the synthetic checkpoint with int16 ranks (the path before bucket "
        "codes) for comparison",
    )
    ap.add_argument(
        "--synthetic-methods",
        default="wanda,besa",
        help="comma-separated arms of the synthetic checkpoint to run (wanda, besa)",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="besa-mem-", dir=args.tmp))
    rows: list[list[str]] = []
    try:
        base = runtime_row(tmp)
        print(
            f"runtime alone (python + torch + transformers + besa_rs imported): {gb(base)} peak RSS"
        )
        if not args.skip_default:
            rows += default_model_rows(tmp, args)
        if not args.skip_7b:
            rows += synthetic_rows(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from besa_rs._table import format_table

    print(f"runtime alone: {gb(base)} of the formula's 1 GB")

    print()
    print(
        format_table(
            [
                "model",
                "method",
                "load",
                "peak RSS",
                "formula (GB): one block + embeddings + caches + 1 GB runtime",
                "formula",
                "s",
            ],
            rows,
        )
    )


def _caches(n: int, seqlen: int, hidden: int, itemsize: int, copies: int) -> int:
    """Activation caches: ``copies`` sets of [n, seqlen, hidden] (inputs, block outputs/targets,
    next inputs)."""
    return copies * n * seqlen * hidden * itemsize


def default_model_rows(tmp: Path, args: argparse.Namespace) -> list[list[str]]:
    from besa_rs.models import resolve_model

    path = resolve_model("smollm2-135m")
    cfg = json.loads((path / "config.json").read_text())
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    block = 4 * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)  # float32
    embed = 4 * v * h
    caches = _caches(args.default_nsamples, args.default_seqlen, h, 4, 3)
    whole = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    rows = []
    for load in ("in-memory", "streamed"):
        rc, peak, secs = run_child(
            prune_cmd(
                "smollm2-135m",
                tmp / f"smol-{load}",
                "sotu",
                args,
                "--method",
                "wanda",
                "--load",
                load,
                "--nsamples",
                str(args.default_nsamples),
                "--seqlen",
                str(args.default_seqlen),
            ),  # fmt: skip
            tmp / f"smol-{load}.log",
        )
        _check(rc, tmp / f"smol-{load}.log")
        if load == "streamed":
            terms = [("block", block), ("embeddings", embed), ("caches", caches)]
        else:
            terms = [("whole model", whole), ("caches", caches)]
        bound, text = formula([*terms, ("runtime", RUNTIME)])
        rows.append(
            [
                "smollm2-135m fp32",
                "wanda",
                load,
                gb(peak),
                text,
                verdict(peak, bound),
                f"{secs:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


def synthetic_rows(tmp: Path, args: argparse.Namespace) -> list[list[str]]:
    model = tmp / "llama7b-shaped-4blocks"
    t0 = time.perf_counter()
    info = write_7b_shaped(model)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(
        f"synthetic 7B-shaped checkpoint: {gb(size)} in 6 shards, written in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    calib = str(calib_text(tmp / "calib.txt"))
    h = info["hidden"]
    steps = args.nsamples  # batch 1, one epoch
    runs = [
        ("wanda", "streamed", ["--method", "wanda"], 2),
        ("besa, 1 block", "streamed", ["--method", "besa", "--blocks", "1"], 3),
    ]
    if args.compare_ranks:
        runs.append(
            ("besa, 1 block, int16 ranks", "streamed", ["--method", "besa", "--blocks", "1"], 3)
        )
    if not args.skip_7b_in_memory:
        runs.append(("wanda", "in-memory", ["--method", "wanda"], 2))
    chosen = {m.strip() for m in args.synthetic_methods.split(",") if m.strip()}
    unknown = chosen - {"wanda", "besa"}
    if unknown:
        raise SystemExit(f"--synthetic-methods: unknown arm(s) {', '.join(sorted(unknown))}")
    runs = [r for r in runs if r[0].split(",")[0] in chosen]
    rows = []
    for method, load, extra, copies in runs:
        out = tmp / f"out-{load}"
        log = tmp / f"{method[:5]}-{load}{'-ranks' if method.endswith('ranks') else ''}.log"
        if args.stages:
            print(f"  stages of {method}, {load}:", flush=True)
        rc, peak, secs = run_child(
            prune_cmd(model, out, calib, args, *extra, "--load", load, "--dtype", "bfloat16"),
            log,
            stages=args.stages,
            ranks=method.endswith("int16 ranks"),
        )
        _check(rc, log)
        caches = _caches(args.nsamples, args.seqlen, h, 2, copies)
        if load == "streamed":
            terms = [
                ("block", info["block_bytes"]),
                ("embeddings", info["embed_bytes"]),
                ("caches", caches),
            ]
        else:
            terms = [("whole model", size), ("caches", caches)]
        bound, text = formula([*terms, ("runtime", RUNTIME)])
        label = f"{method} ({steps} steps)" if method.startswith("besa") else method
        rows.append(
            [
                "LLaMA-7B-shaped x4 bf16",
                label,
                load,
                gb(peak),
                text,
                verdict(peak, bound),
                f"{secs:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def _check(rc: int, log: Path) -> None:
    if rc != 0:
        sys.stderr.write(log.read_text()[-3000:])
        raise SystemExit(f"child failed with status {rc} (log above)")


if __name__ == "__main__":
    main()

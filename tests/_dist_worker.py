"""One rank of the data-parallel tests (tests/test_distributed.py), started by ``torchrun`` or by
the test with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). It joins a
gloo process group and runs ``besa_rs.prune`` (the Python API inside an initialised group).

    python tests/_dist_worker.py equivalence MODEL_DIR OUT_DIR
        prunes MODEL_DIR with every case of CASES on the same tokens; rank 0 saves each pruned
        model's linear weights and report to OUT_DIR/<case>.pt
    python tests/_dist_worker.py bad MODEL_DIR OUT_DIR
        runs the bad-input cases of BAD; every rank writes the one-line error of each to
        OUT_DIR/bad.rank<R>.json
    python tests/_dist_worker.py streamed MODEL_DIR OUT_DIR
        prunes MODEL_DIR with ``besa_rs.prune_streamed`` (streamed loading inside the group) for
        every case of STREAMED into OUT_DIR/<case>; every rank writes what it saw (blocks in
        memory at each load, whether it wrote, its report's load mode) to
        OUT_DIR/<case>.rank<R>.json. Then the ranks stream different checkpoints (rank 1 a copy
        of MODEL_DIR with one tensor changed): each writes its error to
        OUT_DIR/mismatch.rank<R>.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

#: name -> (prune() keyword arguments, number of calibration samples)
CASES: dict[str, tuple[dict, int]] = {
    "wanda": ({"method": "wanda"}, 5),  # 5 samples: 3 on rank 0, 2 on rank 1
    "sparsegpt": ({"method": "sparsegpt"}, 4),
    "besa": ({"method": "besa", "batch_size": 2, "candidate_step": 0.05}, 4),
    "besa-uneven": ({"method": "besa", "batch_size": 3, "candidate_step": 0.05}, 5),
    # joint sparsity + 4-bit quantization: the clipping logits' gradients are summed too
    "besa-wbits4": (
        {"method": "besa", "batch_size": 2, "candidate_step": 0.05, "wbits": 4, "group_size": 32},
        4,
    ),
    # SparseGPT joint with GPTQ: the quantizer's Hessian is the summed one
    "sparsegpt-wbits4": ({"method": "sparsegpt", "wbits": 4, "group_size": 32}, 4),
    # BESA's low-memory CPU path (bucket codes, chunked layers), forced on the tiny model
    "besa-codes": ({"method": "besa", "batch_size": 2, "candidate_step": 0.05, "codes": True}, 4),
}

#: name -> (prune() keyword arguments per rank, number of calibration samples)
BAD: dict[str, tuple[list[dict], int]] = {
    "world-larger-than-samples": ([{"method": "wanda"}] * 2, 1),
    "batch-smaller-than-world": ([{"method": "besa", "batch_size": 1}] * 2, 4),
    "mismatched-settings": ([{"method": "wanda"}, {"method": "wanda", "sparsity": 0.6}], 4),
}


#: name -> (prune_streamed() keyword arguments, number of calibration samples)
STREAMED: dict[str, tuple[dict, int]] = {
    "wanda": ({"method": "wanda"}, 5),
    "besa": ({"method": "besa", "batch_size": 2, "candidate_step": 0.05}, 4),
    "sparsegpt": ({"method": "sparsegpt"}, 4),
    "besa-wbits4": (
        {"method": "besa", "batch_size": 2, "candidate_step": 0.05, "wbits": 4, "group_size": 32},
        4,
    ),
}


def tokens(n: int) -> torch.Tensor:
    from _tiny import tiny_tokens

    return tiny_tokens(n=n, seqlen=16, seed=3)


def load(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_case(model_dir: str, kw: dict, n: int) -> tuple[dict, dict]:
    """One case; ``codes: True`` in ``kw`` forces BESA's bucket-codes path (lean, chunked)."""
    import besa_rs
    from besa_rs.pruning import besa

    kw = dict(kw)
    codes = kw.pop("codes", False)
    saved = besa.COMPACT_CODES, besa.RECOMPUTE_MASKED_WEIGHTS
    if codes:
        besa.COMPACT_CODES = besa.RECOMPUTE_MASKED_WEIGHTS = True
    try:
        model = load(model_dir)
        report = besa_rs.prune(model, tokens(n), progress=False, **kw)
    finally:
        besa.COMPACT_CODES, besa.RECOMPUTE_MASKED_WEIGHTS = saved
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "proj" in k}
    return weights, report


def reference_dir(model_dir: str, kw: dict, n: int, dest: Path) -> dict:
    """The single-process in-memory run of a case, saved as ``besa-rs prune`` saves it
    (``save_pretrained`` and the quantization file); returns its report."""
    from besa_rs.pruning import quant

    model = load(model_dir)
    import besa_rs

    report = besa_rs.prune(model, tokens(n), progress=False, **kw)
    model.save_pretrained(dest, safe_serialization=True)
    quant.write_quant_file(model, dest)
    return report


def run_streamed(model_dir: str, out: Path, kw: dict, n: int) -> dict:
    """``besa_rs.prune_streamed`` on this rank, watching its StreamedModel."""
    import besa_rs
    from besa_rs.pruning import streaming

    seen: dict = {"live": []}
    base = streaming.StreamedModel

    class Watched(base):  # type: ignore[misc, valid-type]
        def load_block(self, i: int) -> None:
            super().load_block(i)
            blocks = self.adapter.blocks
            seen["live"].append(
                sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks)
            )
            seen["writes"] = self.writes
            seen["outer_on_meta"] = self.model.get_input_embeddings().weight.device.type == "meta"

    streaming.StreamedModel = Watched  # type: ignore[misc]
    try:
        report = besa_rs.prune_streamed(model_dir, out, tokens(n), progress=False, **kw)
    finally:
        streaming.StreamedModel = base  # type: ignore[misc]
    seen["load"] = report["load"]["mode"]
    seen["world_size"] = report["distributed"]["world_size"]
    return seen


def changed_copy(model_dir: str, dest: Path) -> str:
    """A copy of ``model_dir`` with one block tensor changed (the same config and shapes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    f = dest / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"] * 2
    save_file(sd, str(f), metadata={"format": "pt"})
    return str(dest)


def main() -> None:
    scenario, model_dir, out = sys.argv[1:4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    r = dist.get_rank()
    try:
        if scenario == "equivalence":
            for name, (kw, n) in CASES.items():
                weights, report = run_case(model_dir, kw, n)
                if r == 0:
                    torch.save({"weights": weights, "report": report}, Path(out) / f"{name}.pt")
        elif scenario == "bad":
            from besa_rs.errors import BesaError

            errors = {}
            for name, (per_rank, n) in BAD.items():
                try:
                    run_case(model_dir, per_rank[r], n)
                    errors[name] = None
                except BesaError as e:
                    errors[name] = f"{type(e).__name__}: {e}"
            (Path(out) / f"bad.rank{r}.json").write_text(json.dumps(errors))
        elif scenario == "streamed":
            from besa_rs.errors import BesaError

            for name, (kw, n) in STREAMED.items():
                seen = run_streamed(model_dir, Path(out) / name, kw, n)
                (Path(out) / f"{name}.rank{r}.json").write_text(json.dumps(seen))
            src = model_dir if r == 0 else changed_copy(model_dir, Path(out) / "changed-copy")
            try:
                run_streamed(src, Path(out) / "mismatch", {"method": "wanda"}, 4)
                error = None
            except BesaError as e:
                error = f"{type(e).__name__}: {e}"
            (Path(out) / f"mismatch.rank{r}.json").write_text(json.dumps(error))
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

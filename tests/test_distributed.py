"""Data-parallel pruning on torch.distributed (gloo, 2 processes of 1 thread each) against the
single-process run with the same global batch: masks, learned rates, bad input, a dying rank,
checkpoints and ``--resume`` (python/besa_rs/pruning/distributed.py); streamed block loading
inside the process group (python/besa_rs/pruning/streaming.py) against the single-process
in-memory run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_worker import BAD, CASES, STREAMED, reference_dir, run_case
from _tiny import prune_args, save_tiny
from safetensors.torch import load_file

from besa_rs.cli import main
from besa_rs.pruning.distributed import Shard, chunk

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "BESA_RS_DIST_TIMEOUT": "120",
}
#: a whole torchrun launch (two processes importing torch and transformers) on a busy machine
LAUNCH_S = 600
#: BESA's learned rates: the ranks' gradient sums and the global batch's norms are added in
#: another order than the single process's, so the rates agree to float32 rounding
RATE_TOL = 1e-5
#: SparseGPT (and GPTQ), and the quantization grids of BESA's learned clipping: the Hessian, or
#: the clipping logits' gradients, are summed over ranks in another order; the weights agree to
#: float32 rounding (measured: at most 1.3e-6; the masks and quantization codes are the same)
WEIGHT_TOL = 1e-5
#: BESA joint with 4-bit weights: with AdamW's epsilon at 1e-12 (the joint default) the
#: clipping logits follow their float32-rounded gradients closely, so a grid moves by rounding
#: and a weight that sat on a rounding boundary lands one code away (measured: 1 of 8192 in one
#: layer). Such weights may differ by at most one grid step of their layer, and only this few:
QUANT_FLIPS = 1e-3
#: and the losses after such a step agree to this relative tolerance (measured: 1.04e-5)
LOSS_TOL_QUANT = 1e-4


def _assert_same_up_to_rounding(got: torch.Tensor, want: torch.Tensor, bits: int | None, what: str):
    """``got`` equals ``want`` to float32 rounding (WEIGHT_TOL), except, for quantized weights,
    a fraction of at most QUANT_FLIPS of the entries that differ by at most one grid step (the
    layer's widest: its weight range over 2^bits - 1)."""
    assert torch.equal(got == 0, want == 0), f"{what}: masks differ"
    diff = (got.float() - want.float()).abs()
    if bits is None:
        torch.testing.assert_close(got, want, rtol=0, atol=WEIGHT_TOL)
        return
    flips = diff > WEIGHT_TOL
    step = float(want.float().max() - want.float().min()) / (2**bits - 1)
    assert int(flips.sum()) <= QUANT_FLIPS * diff.numel(), (
        f"{what}: {int(flips.sum())} codes differ"
    )
    assert float(diff.max()) <= step * 1.001, f"{what}: {float(diff.max())} > a grid step {step}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_ranks(args: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """The two ranks of a launch with torchrun's environment, so each rank's output and exit
    status can be checked on its own."""
    port = str(_free_port())
    procs = []
    for r in range(2):
        e = {**ENV, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(
            subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [*TORCHRUN, *args], env=ENV, capture_output=True, text=True, timeout=LAUNCH_S
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


# ---------------------------------------------------------------------------------------------
# the split


def test_split_is_contiguous_balanced_and_complete():
    assert [chunk(0, 5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [chunk(10, 13, 4, r) for r in range(4)] == [(10, 11), (11, 12), (12, 13), (13, 13)]
    # 7 samples, global batch 3, 2 ranks: batches [0,1,2] [3,4,5] [6]
    s0, s1 = (Shard.plan(7, 3, 2, r) for r in range(2))
    assert s0.indices == [0, 1, 3, 4, 6] and s1.indices == [2, 5]
    assert s0.steps == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert s1.steps == [slice(0, 1), slice(1, 2), slice(2, 2)]  # empty part of the last batch
    for n, b, w in [(32, 2, 2), (33, 4, 3), (5, 5, 2), (8, 8, 8)]:
        parts = [Shard.plan(n, b, w, r) for r in range(w)]
        assert sorted(i for p in parts for i in p.indices) == list(range(n))


# ---------------------------------------------------------------------------------------------
# equivalence with the single process (one torchrun launch, every case)


@pytest.fixture(scope="module")
def dist_runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _torchrun([str(HERE / "_dist_worker.py"), "equivalence", str(tiny_dir), str(out)])
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_result(case, dist_runs, tiny_dir):
    kw, n = CASES[case]
    weights, report = run_case(str(tiny_dir), kw, n)  # one process, the same global batch
    dist = dist_runs[case]
    assert dist["report"]["distributed"]["world_size"] == 2
    assert sum(dist["report"]["distributed"]["samples_per_rank"]) == n
    assert weights.keys() == dist["weights"].keys()
    for name, w in weights.items():
        dw = dist["weights"][name]
        assert torch.equal(w == 0, dw == 0), f"{case} {name}: masks differ"
        if kw["method"] == "sparsegpt" or "wbits" in kw:
            bits = kw.get("wbits") if kw["method"] == "besa" else None
            _assert_same_up_to_rounding(dw, w, bits, f"{case} {name}")
        else:  # the surviving weights are the dense ones
            assert torch.equal(w, dw), name
    tot, dtot = report["totals"], dist["report"]["totals"]
    assert tot["realised_sparsity"] == dtot["realised_sparsity"]
    if kw["method"] == "besa":
        for b, db in zip(report["blocks"], dist["report"]["blocks"], strict=True):
            assert b["steps"] == db["steps"]  # the same number of global-batch steps
            for li, dli in zip(b["layers"], db["layers"], strict=True):
                assert abs(li["learned_sparsity"] - dli["learned_sparsity"]) < RATE_TOL
                assert li["realised_sparsity"] == dli["realised_sparsity"]
            # quantized: a code one step away (QUANT_FLIPS) moves the next steps' losses too
            loss_tol = LOSS_TOL_QUANT if "wbits" in kw else 1e-5
            torch.testing.assert_close(db["loss"], b["loss"], rtol=loss_tol, atol=0)
            # the first batch before and after: the same samples as the single process (each
            # rank runs its part of the first global batch through the finished block)
            torch.testing.assert_close(
                db["first_sample_reconstruction"],
                b["first_sample_reconstruction"],
                rtol=loss_tol,
                atol=0,
            )
            if "wbits" in kw:
                continue
            comm = db["communication"]["bytes"]
            # one all-reduce per step: the logits' gradients and the loss value
            logits = sum(li["groups"] for li in b["layers"]) * 21  # 21 candidates at step 0.05
            assert comm["gradients"] == b["steps"] * (logits + 1) * 4


def test_bad_input_is_refused_on_every_rank(tiny_dir, tmp_path):
    procs = _spawn_ranks(
        [sys.executable, str(HERE / "_dist_worker.py"), "bad", str(tiny_dir), str(tmp_path)]
    )
    for p in procs:
        _, err = p.communicate(timeout=LAUNCH_S)
        assert p.returncode == 0, err[-3000:]
    for r in range(2):
        errors = json.loads((tmp_path / f"bad.rank{r}.json").read_text())
        assert errors.keys() == BAD.keys()
        assert (
            "world size 2 is larger than the 1 calibration samples"
            in errors["world-larger-than-samples"]
        )
        assert (
            "--batch-size 1 is smaller than the world size 2" in errors["batch-smaller-than-world"]
        )
        assert "rank(s) 1 run with settings" in errors["mismatched-settings"]
        assert all(e.startswith("ConfigError") and "\n" not in e for e in errors.values())


# ---------------------------------------------------------------------------------------------
# streamed loading inside the process group (besa_rs.prune_streamed; one torchrun launch)


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def streamed_runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dstream")
    _torchrun([str(HERE / "_dist_worker.py"), "streamed", str(tiny_dir), str(out)])
    return out


@pytest.mark.parametrize("case", list(STREAMED))
def test_streamed_two_ranks_give_the_single_process_in_memory_result(
    case, streamed_runs, tiny_dir, tmp_path
):
    kw, n = STREAMED[case]
    ref = tmp_path / "ref"
    reference_dir(str(tiny_dir), kw, n, ref)  # one process, the whole model in memory
    got_dir = streamed_runs / case
    rep = json.loads((got_dir / "besa_report.json").read_text())
    assert rep["load"]["mode"] == "streamed" and rep["distributed"]["world_size"] == 2
    assert sum(rep["distributed"]["samples_per_rank"]) == n
    want, got = _safetensors(ref), _safetensors(got_dir)
    assert want.keys() == got.keys()  # every tensor, embeddings and norms included
    exact = kw["method"] != "sparsegpt" and "wbits" not in kw
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        if not exact and not g.is_floating_point() and kw["method"] == "besa":
            # integer codes / zero points of BESA's learned grids: QUANT_FLIPS, one code apart
            diff = (g.long() - w.long()).abs()
            assert int((diff > 0).sum()) <= QUANT_FLIPS * diff.numel(), f"{case} {k}"
            assert int(diff.max()) <= 1, f"{case} {k}"
        elif exact or not g.is_floating_point():
            assert torch.equal(g, w), f"{case} {k}"
        else:  # the summed Hessian / clipping gradients: float32 rounding (WEIGHT_TOL)
            bits = kw.get("wbits") if kw["method"] == "besa" else None
            _assert_same_up_to_rounding(g, w, bits, f"{case} {k}")
    for r in range(2):
        seen = json.loads((streamed_runs / f"{case}.rank{r}.json").read_text())
        assert seen["load"] == "streamed" and seen["world_size"] == 2
        assert seen["live"] == [1, 1]  # every rank: one block in memory at a time
        assert seen["outer_on_meta"]  # the embeddings freed after the capture
        assert seen["writes"] == (r == 0)  # rank 0 alone fills the output files
    assert not Path(str(got_dir) + ".checkpoint").exists()


def test_streamed_ranks_must_read_the_same_checkpoint(streamed_runs):
    """Rank 1 streams a copy of the model with one block tensor changed: refused on both ranks
    before any block, nothing written."""
    for r in range(2):
        err = json.loads((streamed_runs / f"mismatch.rank{r}.json").read_text())
        assert err is not None and err.startswith("ConfigError: rank(s) 1 run with settings")
        assert "\n" not in err
    assert not (streamed_runs / "mismatch").exists()
    assert not (streamed_runs / "mismatch.checkpoint").exists()


# ---------------------------------------------------------------------------------------------
# the CLI under torchrun: a dying rank, the checkpoint, --resume


@pytest.mark.parametrize("load", ["auto", "in-memory"])
def test_dying_rank_stops_the_others_and_resume_needs_the_same_world(
    load, tmp_path, calib_file, capsys
):
    """``auto`` streams under torchrun (rank 0 fills the output files in the checkpoint
    directory); ``in-memory`` keeps block files. Either way the resumed two-rank run equals the
    uninterrupted single-process in-memory run bit for bit."""
    model = save_tiny(tmp_path / "m", "llama", layers=3)
    extra = ["--batch-size", "2", "--step", "0.05"]
    args = prune_args(model, tmp_path / "out", calib_file, *extra)
    if load != "auto":
        args += ["--load", load]
    ref = tmp_path / "ref"
    assert main(prune_args(model, ref, calib_file, *extra, "--load", "in-memory")) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    ck = Path(str(out) + ".checkpoint")
    # rank 1 is killed (SIGKILL) in block 1's first step: rank 0 must stop with a clear error
    procs = _spawn_ranks(
        [sys.executable, "-m", "besa_rs.cli", *args],
        env={"BESA_RS_TEST_CRASH_AT": "distributed-block1-rank1"},
    )
    rank0_err = procs[0].communicate(timeout=LAUNCH_S)[1]
    procs[1].communicate(timeout=LAUNCH_S)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, rank0_err[-3000:]
    last = rank0_err.strip().splitlines()[-1]
    assert last.startswith("besa-rs prune: error: rank 0 of 2: lost the other ranks during block 1")
    assert not out.exists()  # nothing under the final name
    state = json.loads((ck / "state.json").read_text())
    assert state["next_block"] == 1 and state["world_size"] == 2
    assert sorted(p.name for p in ck.glob("inputs_*")) == [
        "inputs_001.rank000.pt",
        "inputs_001.rank001.pt",
    ]
    if load == "auto":  # streamed: block 0 is in the output file being filled, no block files
        assert (ck / "model.safetensors").is_file() and not list(ck.glob("block_*"))
    else:
        assert (ck / "block_000.safetensors").is_file()

    # one process cannot continue a two-rank checkpoint
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint was made by 2 rank(s) and this run has 1" in err
    assert len(err.strip().splitlines()) == 1

    # two ranks can: the same model as the uninterrupted single-process run
    besa = shutil.which("besa-rs", path=str(Path(sys.executable).parent)) or "besa-rs"
    _torchrun([besa, *args, "--resume"])
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["resumed_from_block"] == 1
    assert rep["distributed"]["world_size"] == 2
    assert rep["load"]["mode"] == ("streamed" if load == "auto" else "in-memory")
    assert not ck.exists()
    a = load_file(str(ref / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

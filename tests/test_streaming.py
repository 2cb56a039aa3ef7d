"""Streamed block loading (``besa-rs prune --load streamed``, the default for safetensors model
directories): the output equals the in-memory path's bit for bit, for every method, with
quantization, for every supported architecture and for sharded checkpoints; a run killed with
kill -9 resumes to the same model; bad checkpoints fail before anything is written."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import SAMPLE_TEXT, prune_args, save_tiny, single_thread, tiny_tokenizer  # noqa: E402, F401

from besa_rs.cli import main  # noqa: E402


def _prune(model, out, calib, load, *extra):
    assert main(prune_args(model, out, calib, "--load", load, *extra)) == 0
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["load"]["mode"] == load
    return rep


def _strip(report):
    """The report without what legitimately differs between two runs (times, load mode)."""
    if isinstance(report, dict):
        return {
            k: _strip(v)
            for k, v in report.items()
            if not k.endswith("seconds") and k not in ("load", "outputs", "resumed_from_block")
        }
    if isinstance(report, list):
        return [_strip(v) for v in report]
    return report


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _all_tensors(d: Path):
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        out.update(_tensors(f)[1])
    return out


def assert_same_output(a: Path, b: Path):
    """Same files; every file byte-identical except the report (equal but for times), the
    quantization file (equal tensors and metadata: safetensors orders metadata keys freely) and,
    for a sharded output, which shard holds which tensor (save_pretrained's assignment follows
    the storages the loader happened to create); every tensor is bit-identical."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    sharded = (a / "model.safetensors.index.json").is_file()
    if sharded:
        ta, tb = _all_tensors(a), _all_tensors(b)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        ia, ib = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (a, b))
        assert (
            ia["metadata"] == ib["metadata"] and ia["weight_map"].keys() == ib["weight_map"].keys()
        )
    for n in names:
        if sharded and n.startswith("model"):
            continue
        if n == "besa_report.json":
            ra, rb = (json.loads((d / n).read_text()) for d in (a, b))
            assert _strip(ra) == _strip(rb)
        elif n == "quantization.safetensors":
            (ma, ta), (mb, tb) = _tensors(a / n), _tensors(b / n)
            assert ma == mb and ta.keys() == tb.keys()
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        else:
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


def _both(model, calib, tmp_path, *extra):
    ref, out = tmp_path / "mem", tmp_path / "str"
    before = {p.name: p.read_bytes() for p in Path(model).iterdir()}
    _prune(model, ref, calib, "in-memory", *extra)
    rep = _prune(model, out, calib, "streamed", *extra)
    assert_same_output(ref, out)
    # the input is read through private mappings: pruning in place never writes to it
    assert {p.name: p.read_bytes() for p in Path(model).iterdir()} == before
    assert not Path(str(out) + ".checkpoint").exists()
    return ref, out, rep


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "magnitude"],
        ["--method", "wanda"],
        ["--method", "sparsegpt"],
        ["--method", "besa"],
        ["--method", "wanda", "--structure", "2:4", "--reconstruct"],
        ["--method", "besa", "--wbits", "4", "--group-size", "32"],
        ["--method", "sparsegpt", "--wbits", "3", "--group-size", "-1"],
        ["--method", "wanda", "--wbits", "4", "--group-size", "16", "--dtype", "bfloat16"],
        ["--method", "besa", "--sparsity", "0", "--wbits", "4", "--group-size", "32"],
        ["--method", "sparsegpt", "--dtype", "float16", "--blocks", "1"],
    ],
    ids=lambda e: "-".join(a.strip("-") for a in e),
)
def test_streamed_equals_in_memory(tiny_dir, calib_file, tmp_path, extra):
    ref, out, rep = _both(tiny_dir, calib_file, tmp_path, *extra)
    if "--wbits" in extra:
        assert (out / "quantization.safetensors").is_file()
    if "--blocks" in extra:  # the unpruned block is copied through unchanged (in float16)
        assert len(rep["blocks"]) == 1
        src = load_file(str(tiny_dir / "model.safetensors"))
        got = load_file(str(out / "model.safetensors"))
        w = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(got[w], src[w].half())


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "opt", "falcon", "phi", "phi3", "gemma"])
def test_streamed_equals_in_memory_other_architectures(arch, calib_file, tmp_path):
    # OPT ties its output embedding to the input embedding (saved once, as in memory); Falcon
    # and Phi run attention and MLP in parallel; Phi-3 has fused qkv / gate_up projections
    model = save_tiny(tmp_path / arch, arch, layers=2)
    _, out, rep = _both(model, calib_file, tmp_path, "--method", "sparsegpt")
    assert rep["model_type"] == arch and len(rep["blocks"]) == 2
    assert all(len(b["layers"]) >= 4 for b in rep["blocks"])
    assert rep["totals"]["realised_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_gpt_neox_is_loaded_in_memory_with_the_reason(calib_file, tmp_path, capsys):
    # transformers renames GPT-NeoX's checkpoint tensors when it loads them, so the streamed
    # reader cannot find them by the module names: auto says so and loads in memory, and an
    # explicit --load streamed is refused before anything is written
    model = save_tiny(tmp_path / "neox", "gpt_neox", layers=2)
    out = tmp_path / "out"
    assert main(prune_args(model, out, calib_file, "--method", "wanda")) == 0
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["load"]["mode"] == "in-memory" and "converted" in rep["load"]["reason"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(prune_args(model, bad, calib_file, "--load", "streamed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be streamed" in err[0] and "gpt_neox" in err[0]
    assert not bad.exists()


def test_streamed_bfloat16_checkpoint_to_float32(calib_file, tmp_path):
    """A bfloat16 checkpoint pruned in float32 (the default --dtype): converted per tensor."""
    from _tiny import tiny_model

    d = tmp_path / "bf16"
    tiny_model("llama", layers=2).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    _both(d, calib_file, tmp_path, "--method", "wanda")


def test_streamed_sharded_checkpoint_and_sharded_output(calib_file, tmp_path, monkeypatch):
    """Input in four shards with an index; output sharded too (small shard size): same index,
    same shards as save_pretrained with that shard size."""
    from _tiny import tiny_model
    from transformers import PreTrainedModel

    from besa_rs.pruning import streaming

    d = tmp_path / "sharded"
    tiny_model("llama", layers=3).save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(d)
    assert len(list(d.glob("model-*.safetensors"))) > 2
    monkeypatch.setattr(streaming, "MAX_SHARD_SIZE", "150KB")
    save = PreTrainedModel.save_pretrained

    def small_shards(self, *a, **kw):
        return save(self, *a, **{**kw, "max_shard_size": "150KB"})

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", small_shards)
    ref, out, _ = _both(d, calib_file, tmp_path, "--method", "besa")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1


def test_streamed_is_the_default_and_in_memory_is_explained(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(prune_args(tiny_dir, out, calib_file, "--method", "magnitude")) == 0
    assert json.loads((out / "besa_report.json").read_text())["load"]["mode"] == "streamed"
    # a packed checkpoint is decoded in memory: said once, and refused with --load streamed
    from besa_rs import pack

    packed = tmp_path / "packed"
    pack(out, packed, "bitmask")
    args = [
        a for a in prune_args(packed, tmp_path / "o2", calib_file, "--method", "magnitude")
        if a != "--quiet"
    ]  # fmt: skip
    assert main(args) == 0
    assert "loading the whole model in memory: a packed checkpoint" in capsys.readouterr().err
    assert main(args[:3] + ["tmp3"] + args[4:] + ["--load", "streamed"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--load streamed" in err and "cannot be streamed" in err and len(err.splitlines()) == 1


class _Watch:
    """Wraps a StreamedModel: records how many blocks hold real weights at each load."""

    def __init__(self, stream):
        self.stream, self.live = stream, []

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def load_block(self, i):
        self.stream.load_block(i)
        blocks = self.stream.adapter.blocks
        self.live.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))


def test_one_block_in_memory_at_a_time_and_api_route(tmp_path):
    """The skeleton's blocks stay on meta except the one being pruned; the API route writes the
    same directory as the CLI."""
    from _tiny import tiny_tokens

    import besa_rs
    from besa_rs.pruning import streaming

    model = save_tiny(tmp_path / "m", "llama", layers=4)
    toks = tiny_tokens(4, 32)
    made = []
    orig = streaming.StreamedModel

    def watched(*a, **kw):
        made.append(_Watch(orig(*a, **kw)))
        return made[-1]

    streaming.StreamedModel = watched  # type: ignore[misc]
    try:
        rep = besa_rs.prune_streamed(model, tmp_path / "o", toks, method="wanda", progress=False)
    finally:
        streaming.StreamedModel = orig  # type: ignore[misc]
    assert made[0].live == [1, 1, 1, 1]
    assert rep["load"]["mode"] == "streamed" and len(rep["blocks"]) == 4
    # the same as pruning the loaded model in memory
    from besa_rs import load_model, prune

    m = load_model(model)
    prune(m, toks, method="wanda", progress=False)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    for k, v in m.state_dict().items():
        if k in got:
            assert torch.equal(v, got[k]), k
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def test_api_first_block_runs_the_dense_chain_streamed(tmp_path):
    """Blocks before ``first_block`` are loaded, run dense and released; they and the blocks
    after ``num_blocks`` are copied through unchanged."""
    from _tiny import tiny_tokens

    import besa_rs
    from besa_rs import load_model, prune

    model = save_tiny(tmp_path / "m", "llama", layers=4)
    toks = tiny_tokens(4, 32)
    kw = dict(method="sparsegpt", first_block=1, num_blocks=2, progress=False)
    rep = besa_rs.prune_streamed(model, tmp_path / "o", toks, **kw)
    assert [b["index"] for b in rep["blocks"]] == [1, 2]
    m = load_model(model)
    prune(m, toks, **kw)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    src = load_file(str(model / "model.safetensors"))
    for k, v in m.state_dict().items():
        if k in got:
            assert torch.equal(v, got[k]), k
    assert torch.equal(
        got["model.layers.0.mlp.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        got["model.layers.1.mlp.up_proj.weight"], src["model.layers.1.mlp.up_proj.weight"]
    )


def test_streamed_resume_after_kill_is_bit_identical(tmp_path, calib_file):
    model = save_tiny(tmp_path / "m4", "llama", layers=3)
    ref = tmp_path / "ref"
    _prune(model, ref, calib_file, "in-memory", "--wbits", "4", "--group-size", "32")
    out = tmp_path / "out"
    ck = Path(str(out) + ".checkpoint")
    args = prune_args(model, out, calib_file, "--wbits", "4", "--group-size", "32")
    # killed (SIGKILL, as kill -9) right after the first block's checkpoint is complete
    p = subprocess.run(
        [sys.executable, "-m", "besa_rs.cli", *args],
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "BESA_RS_TEST_CRASH_AT": "checkpoint-after-block",
        },
        capture_output=True,
        timeout=600,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert json.loads((ck / "state.json").read_text())["next_block"] == 1
    assert not out.exists()
    assert (ck / "model.safetensors").is_file() and not list(ck.glob("block_*"))
    # resuming in memory is refused: the checkpoint holds the blocks in the streamed layout
    assert main(args + ["--resume", "--load", "in-memory"]) == 2
    assert main(args + ["--resume"]) == 0
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["resumed_from_block"] == 1 and rep["load"]["mode"] == "streamed"
    assert_same_output(ref, out)


def _run_until_first_checkpoint(args: list[str]) -> None:
    """``besa-rs prune args`` in this process, stopped by an exception right after its first
    checkpoint is saved (the checkpoint stays, as after a kill)."""
    from besa_rs.pruning.checkpoint import Checkpointer

    save = Checkpointer.save

    class Stop(Exception):
        pass

    def save_then_stop(self, *a, **kw):
        save(self, *a, **kw)
        raise Stop

    Checkpointer.save = save_then_stop  # type: ignore[method-assign]
    try:
        with pytest.raises(Stop):
            main(args)
    finally:
        Checkpointer.save = save  # type: ignore[method-assign]


def test_streamed_resume_on_the_bucket_codes_path_is_bit_identical(
    tmp_path, calib_file, monkeypatch
):
    """BESA's low-memory CPU path (bucket codes, chunked layers; forced on a tiny model) stopped
    after the first block's checkpoint and resumed gives the uninterrupted run's files."""
    from besa_rs.pruning import besa

    monkeypatch.setattr(besa, "COMPACT_CODES", True)
    monkeypatch.setattr(besa, "RECOMPUTE_MASKED_WEIGHTS", True)
    model = save_tiny(tmp_path / "m", "llama", layers=3)
    ref = tmp_path / "ref"
    assert main(prune_args(model, ref, calib_file)) == 0
    out = tmp_path / "out"
    args = prune_args(model, out, calib_file)
    _run_until_first_checkpoint(args)
    assert not out.exists()
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "besa_report.json").read_text())["resumed_from_block"] == 1
    assert_same_output(ref, out)


def test_streamed_resume_with_a_damaged_output_file_is_refused(tmp_path, calib_file, capsys):
    model = save_tiny(tmp_path / "m", "llama", layers=2)
    out = tmp_path / "o"
    ck = Path(str(out) + ".checkpoint")
    _run_until_first_checkpoint(prune_args(model, out, calib_file, "--method", "wanda"))
    f = ck / "model.safetensors"
    os.truncate(f, f.stat().st_size - 8)
    assert main(prune_args(model, out, calib_file, "--method", "wanda", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors: does not match this run's output layout" in err, err
    assert not out.exists()


# --- bad checkpoints: one line naming the file and tensor, nothing written --------------------
def _expect_error(model, out, calib, capsys, *needles):
    assert main(prune_args(model, out, calib, "--method", "wanda")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    parent = out.parent
    assert not out.exists() and not Path(str(out) + ".checkpoint").exists()
    assert not list(parent.glob(f".{out.name}.*"))


def test_missing_shard_named(calib_file, tmp_path, capsys):
    from _tiny import tiny_model

    d = tmp_path / "m"
    tiny_model("llama", layers=2).save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(d)
    (d / "model-00002-of-00004.safetensors").unlink()
    _expect_error(d, tmp_path / "o", calib_file, capsys, "model-00002-of-00004.safetensors")


def test_tensor_missing_for_a_block_named(tmp_path, calib_file, capsys):
    d = save_tiny(tmp_path / "m", "llama", layers=2)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _expect_error(
        d, tmp_path / "o", calib_file, capsys, "'model.layers.1.mlp.up_proj.weight' (block 1)"
    )


def test_tensor_with_wrong_shape_named(tmp_path, calib_file, capsys):
    d = save_tiny(tmp_path / "m", "llama", layers=2)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _expect_error(
        d,
        tmp_path / "o",
        calib_file,
        capsys,
        "model.safetensors",
        "'model.layers.0.self_attn.o_proj.weight' has shape [64, 32]",
        "[64, 64]",
    )


def test_index_naming_a_tensor_no_shard_holds(calib_file, tmp_path, capsys):
    from _tiny import tiny_model

    d = tmp_path / "m"
    tiny_model("llama", layers=2).save_pretrained(d, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00004.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    shutil.copy(d / "model.safetensors.index.json", tmp_path / "keep.json")
    _expect_error(d, tmp_path / "o", calib_file, capsys, "model.layers.0.mlp.extra.weight")


def test_calib_file_fixture_is_used(calib_file):
    assert calib_file.read_text().startswith(SAMPLE_TEXT[:20])

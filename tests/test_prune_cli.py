"""``besa-rs prune`` end to end on tiny model directories: outputs, resume after kill -9, and
every bad input with its message."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import (  # noqa: E402, F401
    SAMPLE_TEXT,
    prune_args,
    save_tiny,
    single_thread,
    tiny_model,
    tiny_tokens,
)

from besa_rs.cli import main  # noqa: E402


def test_prune_cli_besa_writes_model_report_heatmap(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out, calib_file, "--json", str(tmp_path / "r.json"))) == 0
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "besa_report.json",
        "sparsity_heatmap.png",
    ]:
        assert (out / f).is_file(), f
    assert (out / "sparsity_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not Path(str(out) + ".checkpoint").exists()
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep == {**json.loads((tmp_path / "r.json").read_text()), "outputs": rep["outputs"]}
    assert rep["settings"]["method"] == "besa" and rep["settings"]["granularity"] == "row"
    assert len(rep["blocks"]) == 2
    for b in rep["blocks"]:
        assert abs(b["realised_sparsity"] - 0.5) < 0.005  # exact block sparsity
        assert len(b["loss"]) == 4 and all(v == v for v in b["loss"])
        for li in b["layers"]:
            assert {"learned_sparsity", "hard_sparsity_learned", "realised_sparsity"} <= set(li)
    # the saved weights have exact zeros at the reported rates
    sd = load_file(str(out / "model.safetensors"))
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    for b in rep["blocks"]:
        for li in b["layers"]:
            w = sd[f"model.layers.{b['index']}.{li['name']}.weight"]
            assert abs((w == 0).float().mean().item() - li["realised_sparsity"]) < 1e-6
    assert m(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_cli_baselines(tiny_dir, calib_file, tmp_path, method):
    out = tmp_path / method
    assert (
        main(prune_args(tiny_dir, out, calib_file, "--method", method, "--structure", "2:4")) == 0
    )
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["totals"]["realised_sparsity"] == pytest.approx(0.5)


BAD = [
    (["--sparsity", "1.5"], "sparsity must be strictly between 0 and 1"),
    (["--sparsity", "0"], "sparsity must be strictly between 0 and 1"),
    (["--method", "obs"], "unknown method 'obs'"),
    (["--metric", "taylor"], "unknown metric 'taylor'"),
    (["--granularity", "column"], "unknown granularity 'column'"),
    (["--granularity", "rowblock:x"], "rowblock:K needs a positive integer"),
    (["--granularity", "rowblock:3"], "K=3 does not divide"),
    (["--method", "wanda", "--structure", "3:4:5"], "unknown structure"),
    (["--structure", "2:4"], "N:M is for the uniform baselines"),
    (["--optimizer", "sgd"], "unknown optimizer 'sgd'"),
    (["--method", "magnitude", "--group", "column"], "unknown comparison group 'column'"),
    (
        ["--method", "wanda", "--prune-dense"],
        "prune_dense (targets from the dense chain) is for BESA",
    ),
    (["--wbits", "9"], "wbits must be an integer in 2..8"),
    (["--wbits", "4", "--group-size", "0"], "group_size must be -1"),
    (["--lr", "-1"], "lr must be > 0"),
]


@pytest.mark.parametrize("extra,msg", BAD)
def test_prune_cli_bad_settings(tiny_dir, calib_file, tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    assert main(prune_args(tiny_dir, out, calib_file, *extra)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("besa-rs prune: error:") and msg in last, err
    assert not out.exists()


@pytest.mark.parametrize("extra,msg", [b for b in BAD if "does not divide" not in b[1]])
def test_api_refuses_what_the_cli_refuses(tiny_dir, calib_file, tmp_path, extra, msg):
    """The settings the command line refuses are refused by PruneConfig itself (the CLI only
    reports its ConfigError): the same fields through the API raise the same one-line error."""
    from besa_rs.cli import build_parser
    from besa_rs.commands.prune import CONFIG_OPTIONS
    from besa_rs.errors import ConfigError
    from besa_rs.pruning import PruneConfig

    args = build_parser().parse_args(prune_args(tiny_dir, tmp_path / "o", calib_file, *extra))
    fields = {dest: getattr(args, dest) for dest in CONFIG_OPTIONS.values()}
    with pytest.raises(ConfigError) as e:
        PruneConfig(**fields)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_api_prune_refuses_before_touching_the_model():
    import besa_rs
    from besa_rs.errors import ConfigError

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ({"method": "magnitude", "prune_dense": True}, {"sparsity": 1.5}, {"wbits": 1}):
        with pytest.raises(ConfigError):
            besa_rs.prune(model, tiny_tokens(n=2), progress=False, **bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_defaults_are_the_config_defaults(tmp_path):
    """Every option that sets a PruneConfig field defaults to that field's default (one source
    of truth), and the config the CLI builds from no options equals PruneConfig()."""
    import dataclasses

    from besa_rs.cli import build_parser
    from besa_rs.commands.prune import CONFIG_OPTIONS, config_from_args
    from besa_rs.pruning import PruneConfig

    args = build_parser().parse_args(["prune", "m", "--out", str(tmp_path / "o"), "-q"])
    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    assert len(CONFIG_OPTIONS) >= 25
    for flag, dest in CONFIG_OPTIONS.items():
        assert getattr(args, dest) == defaults[dest], flag
    assert config_from_args(args) == PruneConfig(progress=False)


def test_nm_needs_divisible_columns_cli(tmp_path, calib_file, capsys):
    model = save_tiny(tmp_path / "m100", "llama", intermediate=100)
    assert (
        main(
            prune_args(model, tmp_path / "o", calib_file, "--method", "wanda", "--structure", "4:8")
        )
        == 2
    )
    assert "100 input features are not divisible by M=8" in capsys.readouterr().err


def test_too_short_calibration_text(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(prune_args(tiny_dir, tmp_path / "o", short)) == 2
    err = capsys.readouterr().err
    assert "at least 33 are needed" in err and "9 tokens" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(prune_args(tiny_dir, tmp_path / "o", empty)) == 2
    assert "empty" in capsys.readouterr().err


def test_output_exists_is_refused(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(prune_args(tiny_dir, out, calib_file, "--method", "magnitude")) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    # --overwrite replaces only a previous besa-rs output (issue 14, item 1)
    assert main(prune_args(tiny_dir, out, calib_file, "--method", "magnitude", "--overwrite")) == 2
    assert "not a besa-rs prune output" in capsys.readouterr().err
    (out / "keep.txt").unlink()
    assert main(prune_args(tiny_dir, out, calib_file, "--method", "magnitude", "--overwrite")) == 0
    assert main(prune_args(tiny_dir, out, calib_file, "--method", "wanda", "--overwrite")) == 0
    assert json.loads((out / "besa_report.json").read_text())["settings"]["method"] == "wanda"


def test_unsupported_model_type(tmp_path, calib_file, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path / "t5"
    T5ForConditionalGeneration(
        T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    ).save_pretrained(d)
    from _tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(d)
    assert main(prune_args(d, tmp_path / "o", calib_file)) == 2
    assert "t5" in capsys.readouterr().err


def test_nan_loss_stops_with_clear_error_and_writes_nothing(tmp_path, calib_file, capsys):
    from transformers import AutoModelForCausalLM

    d = save_tiny(tmp_path / "nanmodel", "llama")
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(d)
    out = tmp_path / "o"
    assert main(prune_args(d, out, calib_file)) == 2
    err = capsys.readouterr().err
    assert "block 1: the BESA loss became nan" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".o.*"))  # no temporary output left either


def _run_cli(args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "besa_rs.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_resume_after_kill_is_bit_identical(tmp_path, calib_file, capsys):
    model = save_tiny(tmp_path / "m4", "llama", layers=3)
    ref = tmp_path / "ref"
    assert main(prune_args(model, ref, calib_file)) == 0  # uninterrupted, in this process

    out = tmp_path / "out"
    state = Path(str(out) + ".checkpoint") / "state.json"
    # killed (SIGKILL, as kill -9) right after the first block's checkpoint is complete
    p = _run_cli(
        prune_args(model, out, calib_file), env={"BESA_RS_TEST_CRASH_AT": "checkpoint-after-block"}
    )
    p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL
    assert json.loads(state.read_text())["next_block"] == 1
    assert not out.exists()
    # a plain rerun refuses to clobber the checkpoint
    assert main(prune_args(model, out, calib_file)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(prune_args(model, out, calib_file, "--resume")) == 0
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["resumed_from_block"] == 1
    a = load_file(str(ref / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [x["loss"] for x in rep["blocks"]] == [
        x["loss"] for x in json.loads((ref / "besa_report.json").read_text())["blocks"]
    ]


def test_resume_refuses_other_settings(tmp_path, calib_file, capsys, monkeypatch):
    """A run stopped after its first block leaves a checkpoint; resuming it with another
    setting or other calibration tokens is refused, with the same ones it completes."""
    from besa_rs.pruning.checkpoint import Checkpointer

    model = save_tiny(tmp_path / "m", "llama", layers=2)
    out = tmp_path / "o"
    ck = Path(str(out) + ".checkpoint")

    class Stop(Exception):
        pass

    save = Checkpointer.save

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Stop  # as if the run were killed right after the first checkpoint

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        main(prune_args(model, out, calib_file))
    monkeypatch.undo()
    assert json.loads((ck / "state.json").read_text())["next_block"] == 1
    for other in (["--lambda", "3"], ["--sparsity", "0.6"], ["--optimizer", "prodigy"]):
        assert main(prune_args(model, out, calib_file, "--resume", *other)) == 2, other
        assert "checkpoint was made with different settings" in capsys.readouterr().err
    other_calib = tmp_path / "other.txt"
    other_calib.write_text(SAMPLE_TEXT.upper() * 20)
    assert main(prune_args(model, out, other_calib, "--resume")) == 2  # other calibration tokens
    assert "different settings, model or calibration" in capsys.readouterr().err
    assert not out.exists() and (ck / "state.json").is_file()  # nothing was touched
    assert main(prune_args(model, out, calib_file, "--resume")) == 0
    assert json.loads((out / "besa_report.json").read_text())["resumed_from_block"] == 1
    # without a checkpoint there is nothing to resume
    assert main(prune_args(model, tmp_path / "o2", calib_file, "--resume")) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_resume_after_the_last_block(tmp_path, calib_file):
    """Killed after the last checkpoint but before the outputs: resume just writes them."""
    from besa_rs.data import calibration_set
    from besa_rs.models import load_model, load_tokenizer
    from besa_rs.pruning import PruneConfig
    from besa_rs.pruning.checkpoint import Checkpointer
    from besa_rs.pruning.sequential import run_pruning

    model_dir = save_tiny(tmp_path / "m", "llama", layers=2)
    out = tmp_path / "o"
    args = prune_args(model_dir, out, calib_file, "--method", "wanda")
    cfg = PruneConfig(method="wanda", progress=False)
    toks = calibration_set(load_tokenizer(model_dir), [str(calib_file)], 4, 32, seed=0)
    ck = Checkpointer(Path(str(out) + ".checkpoint"), cfg, toks, resume=False)
    run_pruning(load_model(model_dir), toks, cfg, checkpoint=ck)
    assert main(args + ["--resume"]) == 0
    rep = json.loads((out / "besa_report.json").read_text())
    assert rep["resumed_from_block"] == 2 and len(rep["blocks"]) == 2

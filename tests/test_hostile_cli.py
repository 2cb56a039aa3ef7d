"""Issue 14: the CLI probed as a hostile or careless user would. Nothing on disk is lost or
half-written, nothing is deleted that besa-rs did not create, and every failure is one line
(exit status 2), never a traceback. One test (or a few) per numbered item of the issue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import SAMPLE_TEXT, save_tiny, single_thread  # noqa: E402, F401

from besa_rs import _native  # noqa: E402
from besa_rs.cli import main  # noqa: E402
from besa_rs.errors import ConfigError, FormatError, IntegrityError, ModelError  # noqa: E402
from besa_rs.inspection import inspect  # noqa: E402
from besa_rs.packing import from_packed, load_packed, pack, unpack  # noqa: E402

HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
#: Above the kernel's largest pid (2**22): never a live process.
DEAD_PID = 2**22 + 4321


def _one_line_error(err: str, cmd: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"besa-rs {cmd}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama whose block weights are half zeros (so pack packs them)."""
    d = save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama", layers=2)
    sd = load_file(str(d / "model.safetensors"))
    for k, v in sd.items():
        if ".layers." in k and v.ndim == 2:
            v[v.abs() < v.abs().median()] = 0
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _prune_args(model, out, calib, *extra):
    return [
        "prune", str(model), "--out", str(out), "--calib", str(calib), "--method", "magnitude",
        "--nsamples", "2", "--seqlen", "16", "--quiet", *extra,
    ]  # fmt: skip


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli(args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "besa_rs.cli", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        **kw,
    )


# --- 1. prune never deletes its input, nor anything it did not create ------------------------
def test_item1_prune_refuses_output_overlapping_the_input(tiny_dir, calib_file, tmp_path, capsys):
    model = tmp_path / "parent" / "model"
    shutil.copytree(tiny_dir, model)
    (tmp_path / "parent" / "precious.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(model)
    before = _tree(tmp_path / "parent")
    for out in (model, model.parent, link, model / "sub"):
        assert main(_prune_args(model, out, calib_file, "--overwrite")) == 2
        line = _one_line_error(capsys.readouterr().err, "prune")
        assert "overlaps the input" in line, line
    assert _tree(tmp_path / "parent") == before


def test_item1_prune_overwrite_only_replaces_its_own_output(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(_prune_args(tiny_dir, out, calib_file, "--overwrite")) == 2
    assert "not a besa-rs prune output" in _one_line_error(capsys.readouterr().err, "prune")
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "thesis.tex").unlink()
    assert main(_prune_args(tiny_dir, out, calib_file, "--overwrite")) == 0  # empty: fine
    assert main(_prune_args(tiny_dir, out, calib_file, "--overwrite", "--sparsity", "0.6")) == 0
    assert json.loads((out / "besa_report.json").read_text())["settings"]["sparsity"] == 0.6


# --- 2. replacing an output is safe at every instant; 3. leftovers are cleaned ---------------
def test_item2_kill_during_overwrite_keeps_a_complete_output(tiny_dir, tmp_path):
    out = tmp_path / "p"
    pack(tiny_dir, out, "bitmask", sync=False)
    r = _cli(
        ["pack", str(tiny_dir), "--out", str(out), "--format", "csr", "--overwrite", "-q"],
        env={"BESA_RS_TEST_CRASH_AT": "commit-swapped"},
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    # the final name holds the new, complete output; the old one is a leftover of the dead run
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"][
            "format"
        ]
        == "besa-csr"
    )
    assert load_packed(out).keys() == load_packed(tiny_dir).keys()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.")]
    assert len(left) == 1 and left[0].startswith(".p.partial-"), left
    # the next run removes it and says so
    r = _cli(["pack", str(tiny_dir), "--out", str(out), "--overwrite", "-q"])
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stderr and left[0] in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_item2_output_moved_aside_by_a_killed_run_is_restored(tiny_dir, tmp_path, capsys):
    """Where the file system cannot swap, the old output is moved to .NAME.old-PID-N first; a
    run killed right after that leaves no output: the next run puts it back."""
    out = tmp_path / "u"
    unpack(tiny_dir, out, sync=False)
    backup = tmp_path / f".u.old-{DEAD_PID}-1"
    out.rename(backup)
    stale = tmp_path / f".u.partial-{DEAD_PID}-2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["unpack", str(tiny_dir), "--out", str(out), "-q"]) == 2
    line = _one_line_error(capsys.readouterr().err, "unpack")
    assert "already exists" in line and "restored" in line and str(backup) in line
    assert load_packed(out).keys() == load_packed(tiny_dir).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]
    # the shared ".u.old" name of old versions is never used again: repeated overwrites work
    for _ in range(3):
        assert main(["unpack", str(tiny_dir), "--out", str(out), "--overwrite", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


def test_item3_partial_dirs_of_dead_runs_are_removed_live_ones_kept(tiny_dir, tmp_path):
    out = tmp_path / "o"
    dead = [tmp_path / f".o.partial-{DEAD_PID}-7", tmp_path / f".o.partial-{DEAD_PID + 1}-8"]
    live = tmp_path / f".o.partial-{os.getppid()}-9"  # the pytest runner's parent: alive
    for d in [*dead, live]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    report = pack(tiny_dir, out, sync=False)
    assert sum("removed" in w for w in report["warnings"]) == 2
    assert all(not d.exists() for d in dead) and live.exists()
    notes = _native.recover_leftovers(tmp_path / "prune-out")
    assert notes == []


def test_item3_pack_killed_before_its_commit_leaves_no_output(tiny_dir, tmp_path):
    out = tmp_path / "p"
    r = _cli(
        ["pack", str(tiny_dir), "--out", str(out), "-q"],
        env={"BESA_RS_TEST_CRASH_AT": "pack-before-commit"},
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and len(list(tmp_path.glob(".p.partial-*"))) == 1
    r = _cli(["pack", str(tiny_dir), "--out", str(out), "-q"])
    assert r.returncode == 0 and "removed" in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def test_item3_prune_killed_before_moving_its_output_in(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "o"
    r = _cli(
        _prune_args(tiny_dir, out, calib_file),
        env={"BESA_RS_TEST_CRASH_AT": "atomic-dir-before-commit"},
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and len(list(tmp_path.glob(".o.partial-*"))) == 1
    r = _cli(_prune_args(tiny_dir, out, calib_file, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stderr and (out / "besa_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_item3_leftovers_of_older_versions_restored_or_reported(tiny_dir, tmp_path):
    out = tmp_path / "o"
    pack(tiny_dir, out, sync=False)
    out.rename(tmp_path / ".o.old")  # the shared backup name of older versions
    (tmp_path / ".o.k2j_x9ab.partial").mkdir()  # an older Python writer's temporary name
    notes = _native.recover_leftovers(out)
    assert notes[0].startswith(f"restored {out}") and (out / "config.json").is_file()
    assert "k2j_x9ab.partial" in notes[1] and "older besa-rs" in notes[1]
    assert (tmp_path / ".o.k2j_x9ab.partial").is_dir()  # writer unknown: reported, kept


def test_item3_prune_output_uses_the_same_leftover_recovery(tiny_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "o"
    stale = tmp_path / f".o.partial-{DEAD_PID}-3"
    stale.mkdir()
    assert main(_prune_args(tiny_dir, out, calib_file)) == 0
    assert "removed" in capsys.readouterr().err and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# --- 4. incomplete packed modules are IntegrityErrors everywhere ----------------------------
@pytest.mark.parametrize(
    "name", ["bitmask_anchor_missing", "module_listed_but_absent", "checksum_without_module"]
)
def test_item4_incomplete_packed_module_refused_everywhere(name, tmp_path, capsys):
    path = HOSTILE / name
    for call in (
        lambda: load_packed(path),
        lambda: unpack(path, tmp_path / "u"),
        lambda: inspect(path),
        lambda: from_packed(path),
    ):
        with pytest.raises(IntegrityError, match="packed"):
            call()
    assert main(["simulate", str(path), "-q"]) == 2
    assert "packed" in _one_line_error(capsys.readouterr().err, "simulate")
    assert list(tmp_path.iterdir()) == []


def test_item4_deleting_one_modules_bitmask_from_a_real_pack(tiny_dir, tmp_path):
    pack(tiny_dir, tmp_path / "p", sync=False)
    f = tmp_path / "p" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        meta = fh.metadata()
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    victim = next(k for k in sd if k.endswith(".bitmask"))
    del sd[victim]
    save_file(sd, str(f), metadata=meta)
    with pytest.raises(IntegrityError, match="bitmask part is missing"):
        unpack(tmp_path / "p", tmp_path / "u")
    assert not (tmp_path / "u").exists()


# --- 5. from_packed with a hostile config.json ---------------------------------------------
def test_item5_from_packed_bad_config_is_a_besa_error(tiny_dir, tmp_path):
    p = tmp_path / "p"
    pack(tiny_dir, p, sync=False)
    cfg = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text("[]")
    with pytest.raises(FormatError, match=r"config\.json: must hold a JSON object"):
        from_packed(p)
    (p / "config.json").write_text(json.dumps(dict(cfg, hidden_size=48)))
    with pytest.raises(ModelError, match="does not describe the stored tensors.*mismatch"):
        from_packed(p)
    (p / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads="many")))
    with pytest.raises(ModelError):
        from_packed(p)


# --- 6. duplicate names and overflowing shapes (fixtures; here through load_packed) -----------
def test_item6_duplicate_names_and_zero_dim_overflow(tmp_path):
    with pytest.raises(FormatError, match="appears twice"):
        load_packed(HOSTILE / "duplicate_tensor_name")
    with pytest.raises(FormatError, match="overflow"):
        load_packed(HOSTILE / "zero_dim_overflow")


# --- 7. inspect verifies checksums ----------------------------------------------------------
def test_item7_inspect_verifies_checksums(tiny_dir, tmp_path, capsys):
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        inspect(HOSTILE / "checksum_mismatch")
    assert main(["inspect", str(HOSTILE / "checksum_mismatch")]) == 2
    assert "checksum mismatch" in _one_line_error(capsys.readouterr().err, "inspect")
    assert main(["inspect", "--no-verify", "--summary", str(HOSTILE / "checksum_mismatch")]) == 0
    assert "NOT verified" in capsys.readouterr().out
    pack(tiny_dir, tmp_path / "p", sync=False)
    rep = inspect(tmp_path / "p")
    n = len(rep["packed"])
    assert n > 0 and rep["verified"] == {"packed_tensors": n, "checksums": n}
    assert main(["inspect", "--summary", str(tmp_path / "p")]) == 0
    assert f"verified: {n} packed tensors ({n} CRC-32 checksums) OK" in capsys.readouterr().out


# --- 8. eval / prune on a model whose model.safetensors is hostile --------------------------
HOSTILE_WEIGHTS = {
    "not_json": (b"\x10\0\0\0\0\0\0\0" + b"not json at all!", "invalid"),
    "huge_header": ((2**40).to_bytes(8, "little") + b"{}      ", "100 MB"),
    "overflowing_shape": (
        (
            Path(__file__).parent / "fixtures" / "corrupt" / "shape_overflow.safetensors"
        ).read_bytes(),
        "overflow",
    ),
    "empty": (b"", "8-byte header length is missing"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_WEIGHTS))
def test_item8_eval_and_prune_validate_weights_first(kind, tiny_dir, calib_file, tmp_path, capsys):
    data, fragment = HOSTILE_WEIGHTS[kind]
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "model.safetensors").write_bytes(data)
    assert main(["eval", str(model), "--text", str(calib_file), "--seqlen", "16", "-q"]) == 2
    line = _one_line_error(capsys.readouterr().err, "eval")
    assert "model.safetensors" in line and fragment in line, line
    assert main(_prune_args(model, tmp_path / "o", calib_file)) == 2
    line = _one_line_error(capsys.readouterr().err, "prune")
    assert "model.safetensors" in line and fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- 9. eval on a packed checkpoint ---------------------------------------------------------
def test_item9_eval_on_packed_checkpoint_loads_through_from_packed(
    tiny_dir, calib_file, tmp_path, capsys
):
    pack(tiny_dir, tmp_path / "p", sync=False)
    args = ["--text", str(calib_file), "--seqlen", "16", "--max-windows", "2", "-q", "--json"]
    assert main(["eval", str(tiny_dir), *args, str(tmp_path / "d.json")]) == 0
    assert main(["eval", str(tmp_path / "p"), *args, str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    a = json.loads((tmp_path / "d.json").read_text())["perplexity"]
    b = json.loads((tmp_path / "p.json").read_text())["perplexity"]
    assert a == pytest.approx(b, rel=1e-6)


# --- 10. prune output on a read-only / full file system -------------------------------------
def _mount_tmpfs(where: Path, size: str, ro: bool = False) -> bool:
    where.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
    )
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    mounts = []

    def make(name: str, size: str, ro: bool = False) -> Path:
        d = tmp_path / name
        if not _mount_tmpfs(d, size, ro):
            pytest.skip("needs permission to mount a tmpfs")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_item10_prune_on_read_only_or_full_fs_fails_before_work(
    tiny_dir, calib_file, small_fs, capsys
):
    ro = small_fs("ro", "1m", ro=True)
    full = small_fs("full", "64k")
    for out, fragment in ((ro / "o", "Read-only file system"), (full / "o", "free")):
        assert main(_prune_args(tiny_dir, out, calib_file)) == 2
        line = _one_line_error(capsys.readouterr().err, "prune")
        assert fragment in line, line
        assert list(out.parent.iterdir()) == []  # no output, no checkpoint directory


def test_item10_write_failure_during_prune_is_one_line_and_leaves_no_checkpoint(
    tiny_dir, calib_file, small_fs, capsys
):
    """The space check passes (the model is tiny), then a file fills the disk mid-run."""
    fs = small_fs("fs", "2m")
    out = fs / "o"
    from besa_rs.pruning import checkpoint as ck

    orig = ck.Checkpointer.save

    def fill_then_save(self, *a, **kw):
        with open(fs / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        return orig(self, *a, **kw)

    ck.Checkpointer.save = fill_then_save
    try:
        assert main(_prune_args(tiny_dir, out, calib_file)) == 2
    finally:
        ck.Checkpointer.save = orig
    line = _one_line_error(capsys.readouterr().err, "prune")
    assert "No space left on device" in line, line
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


# --- 11. --json / --plot validated before the work ------------------------------------------
def test_item11_json_and_plot_paths_checked_before_work(tiny_dir, tmp_path, small_fs, capsys):
    pack(tiny_dir, tmp_path / "p", sync=False)
    ro = small_fs("ro", "1m", ro=True)
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    for bad, fragment in ((a_dir, "existing directory"), (ro / "r.json", "Read-only")):
        cmds = {
            "pack": ["pack", str(tiny_dir), "--out", str(tmp_path / "o1"), "--json", str(bad)],
            "unpack": ["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "o2"), "--json", str(bad)],
            "simulate": ["simulate", str(tmp_path / "p"), "-q", "--json", str(bad)],
            "inspect": ["inspect", str(tmp_path / "p"), "--json", str(bad)],
        }  # fmt: skip
        for cmd, argv in cmds.items():
            assert main(argv) == 2, cmd
            line = _one_line_error(capsys.readouterr().err, cmd)
            assert "--json" in line and fragment in line, line
        assert main(["simulate", str(tmp_path / "p"), "-q", "--plot", str(bad)]) == 2
        assert "--plot" in _one_line_error(capsys.readouterr().err, "simulate")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    full = small_fs("full", "1m")
    with open(full / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    assert main(["inspect", str(tmp_path / "p"), "--json", str(full / "r.json")]) == 2
    assert "No space left on device" in _one_line_error(capsys.readouterr().err, "inspect")


# --- 12. --out inside the input is always refused -------------------------------------------
def test_item12_out_inside_input_refused_even_when_absent(tiny_dir, tmp_path, capsys):
    src = tmp_path / "m"
    shutil.copytree(tiny_dir, src)
    pack(src, tmp_path / "p", sync=False)
    for cmd, inp in (("pack", src), ("unpack", tmp_path / "p")):
        before = {p.name for p in inp.iterdir()}
        for out in (inp / "sub", inp / "a" / "b"):
            assert main([cmd, str(inp), "--out", str(out), "-q"]) == 2
            assert "overlaps the input" in _one_line_error(capsys.readouterr().err, cmd)
            assert {p.name for p in inp.iterdir()} == before  # nothing written inside
    with pytest.raises(ConfigError, match="overlaps"):
        _native.check_out(src, tmp_path / "m" / ".." / "m" / "x")


# --- 13. a prune killed inside its first checkpoint write -----------------------------------
def test_item13_incomplete_first_checkpoint_is_restarted(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "o"
    ckdir = tmp_path / "o.checkpoint"
    for extra in ([], ["--resume"]):
        r = _cli(
            _prune_args(tiny_dir, out, calib_file),
            env={"BESA_RS_TEST_CRASH_AT": "checkpoint-after-block-file"},
        )
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert ckdir.is_dir() and not (ckdir / "state.json").exists()
        r = _cli(_prune_args(tiny_dir, out, calib_file, *extra))
        assert r.returncode == 0, r.stderr
        assert "incomplete first checkpoint" in r.stderr
        assert (out / "besa_report.json").is_file() and not ckdir.exists()
        shutil.rmtree(out)


# --- 14. messages that say what is actually wrong -------------------------------------------
def test_item14_fifo_and_device_inputs_are_named(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, what in ((fifo, "FIFO"), (Path("/dev/zero"), "character device")):
        for argv in (["inspect", str(path)], ["pack", str(path), "--out", str(tmp_path / "o")]):
            assert main(argv) == 2
            line = _one_line_error(capsys.readouterr().err, argv[0])
            assert what in line and "Not a directory" not in line, line


def test_item14_concurrent_loser_gets_a_clear_message(tmp_path):
    final = tmp_path / "out"
    tmp = Path(_native.make_partial_dir(final))
    (tmp / "a").write_text("mine")
    final.mkdir()  # another process got there first
    (final / "b").write_text("theirs")
    with pytest.raises(ConfigError, match="created by another process while this run was writing"):
        _native.commit_dir(tmp, final, overwrite=False, sync=False)
    assert (final / "b").read_text() == "theirs"
    _native.commit_dir(tmp, final, overwrite=True, sync=False)  # swapped atomically
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_item14_concurrent_overwrite_packs_both_succeed(tiny_dir, tmp_path):
    out = tmp_path / "p"
    pack(tiny_dir, out, sync=False)
    argv = [sys.executable, "-m", "besa_rs.cli", "pack", str(tiny_dir), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        procs = [
            subprocess.Popen(
                [*argv, "--overwrite", "-q"], env=env, stderr=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
    assert load_packed(out).keys() == load_packed(tiny_dir).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_item14_simulate_prints_no_progress_before_a_crc_error(capsys):
    assert main(["simulate", str(HOSTILE / "checksum_mismatch")]) == 2
    captured = capsys.readouterr()
    assert "checksum mismatch" in _one_line_error(captured.err, "simulate")
    assert captured.out == ""

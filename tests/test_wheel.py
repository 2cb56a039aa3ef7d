"""The path the package is meant for (README, first lines): ``pip install .`` builds a wheel
(maturin, release), which installs into a fresh environment and works from outside the source
tree. Offline: the wheel is built without build isolation from the already fetched crates, and
the fresh environment reuses this environment's installed dependencies (torch, transformers...)
through a ``.pth`` file, so nothing is downloaded. Skipped when the build tools (pip with
maturin, cargo) are missing."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _installed(dist: str) -> bool:
    # importlib.metadata, not importlib.util.find_spec("pip"): looking pip up through the import
    # system trips setuptools' distutils shim (its meta-path finder switches this process back to
    # the stdlib distutils), and torch's cpp_extension then fails to import setuptools in later
    # tests (tests/test_ste_ext.py)
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _installed("maturin") or not _installed("pip") or shutil.which("cargo") is None,
        reason="needs pip, maturin and cargo to build the wheel offline",
    ),
]

SMOKE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import besa_rs
    import besa_rs._native

    venv = Path(sys.argv[1]).resolve()
    assert Path(besa_rs.__file__).resolve().is_relative_to(venv), besa_rs.__file__
    assert Path(besa_rs._native.__file__).resolve().is_relative_to(venv)
    work = Path.cwd()

    # pack / unpack a tiny random checkpoint with half of its block weights zero
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[torch.rand(32, 64, generator=g) < 0.5] = 0.0
    src = work / "ckpt"
    src.mkdir()
    sd = {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": torch.ones(64)}
    save_file(sd, str(src / "model.safetensors"))
    rep = besa_rs.pack(src, work / "packed", format="bitmask")
    assert rep["totals"]["packed"] == 1, rep["totals"]
    back = besa_rs.load_packed(work / "packed")
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    besa_rs.unpack(work / "packed", work / "unpacked")
    assert besa_rs.inspect(work / "unpacked") is not None

    # prune a tiny random model with magnitude, then pack it from memory
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    toks = torch.randint(0, 128, (2, 16))
    report = besa_rs.prune(model, toks, method="magnitude", sparsity=0.5, progress=False)
    assert abs(report["totals"]["realised_sparsity"] - 0.5) < 1e-6, report["totals"]
    rep = besa_rs.pack(model, work / "pruned-packed")
    assert rep["totals"]["packed"] == 2 * 7, rep["totals"]
    print("smoke ok")
    """
)


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r


def test_wheel_builds_installs_and_runs_outside_the_tree(tmp_path):
    offline = {
        **os.environ,
        "CARGO_NET_OFFLINE": "true",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    wheels = tmp_path / "wheels"
    # what `pip install .` does, without fetching maturin into an isolated build environment
    _run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), "-q"],
        env=offline,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("besa_rs-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    vpy = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", str(wheel)]
        + ["-q"],
        env=offline,
        cwd=tmp_path,
    )
    # the fresh environment reuses this one's dependencies (no network): a path entry only,
    # so this environment's editable besa_rs (a .pth of its own) is not picked up
    site = _run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    deps = sysconfig.get_paths()["purelib"]
    (Path(site.stdout.strip()) / "project-deps.pth").write_text(deps + "\n")

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in offline.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    r = _run([str(vpy), "-c", SMOKE, str(venv)], cwd=work, env=env)
    assert "smoke ok" in r.stdout
    r = _run([str(venv / "bin" / "besa-rs"), "inspect", str(work / "packed")], cwd=work, env=env)
    assert "up_proj" in r.stdout

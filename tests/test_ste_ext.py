"""The fused CUDA extension compiles (with the pip-installed nvcc, no GPU needed) and loads."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from besa_rs import ste
from besa_rs.ste import _ext


def test_extension_compiles_and_loads():
    if torch.version.cuda is None:
        pytest.skip("this torch build has no CUDA support, so there is nothing to compile")
    if _ext.find_cuda_home() is None:
        msg = "nvcc not found (install nvidia-cuda-nvcc matching torch's CUDA, see Makefile)"
        if os.environ.get("CI") == "true":  # CI installs it: a kernel that does not build fails
            pytest.fail(msg)
        pytest.skip(msg)
    mod = _ext.build()
    assert callable(mod.forward) and callable(mod.backward)
    assert "straight-through" in (mod.__doc__ or "")
    assert os.path.exists(mod.__file__)
    assert _ext.build() is mod  # cached in-process
    key = _ext.build_key(_ext._arch_list())
    assert key in mod.__file__, "build folder is keyed by the source hash"
    if not torch.cuda.is_available():
        # the kernels check their inputs before launching anything
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            mod.forward(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2))


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(_ext, "_STATE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "find_cuda_home", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    with pytest.warns(RuntimeWarning, match="PyTorch fallback"):
        assert _ext.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load() is None
        assert ste.backend("cuda") == "torch"


def test_forced_fallback(monkeypatch):
    monkeypatch.setenv("BESA_STE_BACKEND", "torch")
    assert ste.backend("cuda") == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_selected():
    assert ste.backend("cuda") == "cuda-ext"


def test_build_command(capsys):
    if torch.version.cuda is None or _ext.find_cuda_home() is None:
        pytest.skip("no CUDA toolchain to build with")
    from besa_rs.ste.__main__ import main

    assert main(["build"]) == 0
    assert "CUDA extension ready" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """benches/gpu_check.py runs only when a session has a GPU; its CPU dry run (the same
    equivalence cases, fallback only) keeps it from rotting in between."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(root / "benches" / "gpu_check.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "0 failures" in res.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == [] and len(report["checks"]) > 100

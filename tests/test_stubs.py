"""The hand-written stubs of the Rust extension match what it exports (mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_native_stubs_match_the_extension():
    cfg = Path(__file__).with_name("stubtest.ini")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "besa_rs._native", "--mypy-config-file", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""The CUDA kernels of ``besa_rs.ste`` compiled with g++ for a CPU emulator of CUDA threads,
blocks, shared memory, barriers and warp shuffles (``include/cuda_emu.h``), so their logic is
tested without a GPU.

:func:`load` compiles ``emu_api.cpp`` (which includes the production ``ste_mask_kernel.cu``)
once per source hash into ``$BESA_STE_CACHE`` (default ``~/.cache/besa-rs/ste``).
:class:`EmulatedExtension` has the ``forward`` / ``backward`` of the real extension
(``csrc/ste_mask.cpp``) for CPU tensors, so ``besa_rs.ste`` can run its ``cuda-ext`` path on it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import torch

from besa_rs.ste import _ext

HERE = Path(__file__).parent
KERNEL = _ext._CSRC / "ste_mask_kernel.cu"
SOURCES = [HERE / "emu_api.cpp", *sorted((HERE / "include").glob("*.h")), KERNEL]

IDX_CODE = {torch.int16: 0, torch.int32: 1, torch.int64: 2}
SCALAR_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CUDA_ERRORS = {0: "success", 1: "invalid value", 9: "invalid configuration", 719: "launch failure"}


class EmulatorError(RuntimeError):
    pass


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def load() -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no C++ compiler (g++) to build the CUDA emulator")
    h = hashlib.sha256()
    for p in SOURCES:
        h.update(p.read_bytes())
    lib = _ext.cache_root() / f"emu-{h.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            cxx,
            "-std=c++20",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",
            "-shared",
            "-fPIC",
            "-I",
            str(HERE / "include"),
            str(HERE / "emu_api.cpp"),
            "-o",
            str(tmp),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise EmulatorError(f"compiling the CUDA emulator failed:\n{res.stderr}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.emu_select.argtypes = [c_int, c_int, p, p, p, p, i64, i64]
    dll.emu_bucket_sums.argtypes = [c_int, c_int, c_int, p, p, p, p, c_int, p, i64, i64]
    dll.emu_set_seed.argtypes = [ctypes.c_uint64]
    dll.emu_last_message.restype = ctypes.c_char_p
    return dll


class EmulatedExtension:
    """``forward`` / ``backward`` with the contract of the TORCH_LIBRARY ops in ste_mask.cpp."""

    def __init__(self, dll: ctypes.CDLL, seed: int = 0):
        self.dll = dll
        self.dll.emu_set_seed(seed)
        self.calls: Counter[str] = Counter()

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = self.dll.emu_last_message().decode()
            raise EmulatorError(f"{what}: {CUDA_ERRORS.get(rc, rc)} {msg}".strip())

    def forward(self, src: torch.Tensor, ranks: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
        assert src.dim() == 2 and src.is_contiguous() and ranks.shape == src.shape
        assert ranks.is_contiguous() and src.dtype in SCALAR_CODE
        self.calls["forward"] += 1
        n = n_rows.to(torch.int64).contiguous()
        out = torch.empty_like(src)
        rc = self.dll.emu_select(
            src.element_size(),
            IDX_CODE[ranks.dtype],
            src.data_ptr(),
            ranks.data_ptr(),
            n.data_ptr(),
            out.data_ptr(),
            src.shape[0],
            src.shape[1],
        )
        self._check(rc, "select kernel")
        return out

    def bucket_sums(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        ranks: torch.Tensor,
        t_sorted: torch.Tensor,
        acc_double: bool,
    ) -> torch.Tensor:
        assert grad.dtype == weight.dtype and grad.shape == weight.shape == ranks.shape
        assert grad.is_contiguous() and weight.is_contiguous() and ranks.is_contiguous()
        t = t_sorted.to(torch.int64).contiguous()
        hist = torch.empty(
            ranks.shape[0], t.numel() + 1, dtype=torch.float64 if acc_double else torch.float32
        )
        rc = self.dll.emu_bucket_sums(
            SCALAR_CODE[weight.dtype],
            IDX_CODE[ranks.dtype],
            int(acc_double),
            grad.data_ptr(),
            weight.data_ptr(),
            ranks.data_ptr(),
            t.data_ptr(),
            t.numel(),
            hist.data_ptr(),
            ranks.shape[0],
            ranks.shape[1],
        )
        self._check(rc, "bucket-sum kernel")
        return hist

    def backward(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        ranks: torch.Tensor,
        n_rows: torch.Tensor,
        t_sorted: torch.Tensor,
        need_weight_grad: bool,
        acc_double: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["backward"] += 1
        hist = self.bucket_sums(grad, weight, ranks, t_sorted, acc_double)
        gw = self.forward(grad, ranks, n_rows) if need_weight_grad else grad.new_empty(0)
        return hist, gw

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

import numpy as np
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
    dll.emu_neg_suffix.argtypes = [c_int, p, i64, c_int, p]
    dll.emu_prune_rows.argtypes = [c_int, p, i64, i64, i64, p]
    dll.emu_set_seed.argtypes = [ctypes.c_uint64]
    dll.emu_set_optin_shared.argtypes = [i64]
    dll.emu_last_smem.restype = i64
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

    def neg_suffix(self, h: torch.Tensor) -> torch.Tensor:
        """``out[g, d] = -sum_{i > d} h[g, i]`` ([G, n] -> [G, n - 1]) by the suffix kernel."""
        assert h.dim() == 2 and h.dtype in (torch.float32, torch.float64)
        h = h.contiguous()
        out = torch.empty(h.shape[0], h.shape[1] - 1, dtype=h.dtype)
        rc = self.dll.emu_neg_suffix(
            int(h.dtype == torch.float64), h.data_ptr(), h.shape[0], h.shape[1], out.data_ptr()
        )
        self._check(rc, "suffix-sum kernel")
        return out

    def prune_rows(self, alpha: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        assert alpha.dim() == 1 and rows % alpha.shape[0] == 0
        assert alpha.dtype in (torch.float32, torch.float64)
        self.calls["prune_rows"] += 1
        a = alpha.contiguous()
        n = torch.empty(rows, dtype=torch.int64)
        rc = self.dll.emu_prune_rows(
            int(a.dtype == torch.float64),
            a.data_ptr(),
            rows,
            rows // a.shape[0],
            cols,
            n.data_ptr(),
        )
        self._check(rc, "prune-count kernel")
        return n

    def backward(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        ranks: torch.Tensor,
        n_rows: torch.Tensor,
        t_sorted: torch.Tensor,
        rows_per_group: int,
        need_weight_grad: bool,
        acc_double: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["backward"] += 1
        hist = self.bucket_sums(grad, weight, ranks, t_sorted, acc_double)
        if rows_per_group > 1:  # torch's sum, as in ste_mask.cpp
            hist = hist.view(-1, rows_per_group, hist.shape[1]).sum(1)
        grad_w = self.neg_suffix(hist)
        gw = self.forward(grad, ranks, n_rows) if need_weight_grad else grad.new_empty(0)
        return grad_w, gw


# ------------------------------------------------------------------------------------------
# the bucket kernel's summation order, in torch (CPU): a bit-exact model of its results
def segment_length(cols: int, n_cand: int, acc: torch.dtype) -> int:
    """The length of the summation pieces (ste_mask_kernel.cu, "Summation order")."""
    a = 8 if acc == torch.float64 else 4
    return min(cols, (48 * 1024 - (n_cand * 8 + (n_cand + 1) * a + 16)) // a)


def bucket_sums_in_kernel_order(
    grad: torch.Tensor,
    weight: torch.Tensor,
    ranks: torch.Tensor,
    t_sorted: torch.Tensor,
    acc: torch.dtype,
) -> torch.Tensor:
    """The bucket sums computed in the kernel's documented order, so that they are the same
    bits: each bucket's rank range is cut at the multiples of the piece length; in each piece,
    lane l of a warp adds the products of ranks lo+l, lo+l+32, ... in order from 0; the 32 lane
    sums are combined by the shuffle tree 16, 8, 4, 2, 1; the pieces are added in rank order."""
    grad, weight, ranks, t_sorted = (x.detach().cpu() for x in (grad, weight, ranks, t_sorted))
    rows, cols = ranks.shape
    n_cand = t_sorted.numel()
    seg = segment_length(cols, n_cand, acc)
    npd = np.float64 if acc == torch.float64 else np.float32
    prod = grad.to(acc) * weight.to(acc)
    t = [int(x) for x in t_sorted]
    out = torch.zeros(rows, n_cand + 1, dtype=acc)
    for r in range(rows):
        p = torch.zeros(cols, dtype=acc)
        p[ranks[r].long()] = prod[r]
        pieces = []  # (bucket, start, end)
        for j in range(n_cand + 1):
            lo = t[j] if j < n_cand else 0
            hi = t[j - 1] if j > 0 else cols
            a = lo
            while a < hi:
                b = min(hi, (a // seg + 1) * seg)
                pieces.append((j, a, b))
                a = b
        if not pieces:
            continue
        width = max((b - a + 31) // 32 for _, a, b in pieces)
        lanes = torch.zeros(len(pieces), width * 32, dtype=acc)
        for i, (_, a, b) in enumerate(pieces):
            lanes[i, : b - a] = p[a:b]
        lanes = lanes.view(len(pieces), width, 32)
        s = torch.zeros(len(pieces), 32, dtype=acc)
        for k in range(width):  # sequential per lane (adding a +0 pad changes nothing)
            s = s + lanes[:, k]
        for off in (16, 8, 4, 2, 1):
            nxt = s.clone()
            nxt[:, : 32 - off] = s[:, : 32 - off] + s[:, off:]
            s = nxt
        total = [npd(0)] * (n_cand + 1)
        for (j, _, _), v in zip(pieces, s[:, 0].numpy(), strict=True):
            total[j] = npd(total[j] + v)
        out[r] = torch.from_numpy(np.array(total, dtype=npd))
    return out

"""Build and load the fused CUDA extension (``csrc/``) with ``torch.utils.cpp_extension``.

The build is cached under ``$BESA_STE_CACHE`` (default ``~/.cache/besa-rs/ste``) in a folder
keyed by a hash of the sources, the torch version, its CUDA version and the target
architectures, so it compiles once per machine/environment. ``CUDA_HOME`` is taken from the
environment, from torch's own detection, or assembled from the ``nvidia-cuda-nvcc`` /
``nvidia-cuda-runtime`` wheels installed next to torch (``site-packages/nvidia/cu13``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("ste_mask.cpp", "ste_mask_kernel.cu")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


class ExtensionBuildError(RuntimeError):
    """The CUDA extension could not be compiled or loaded."""


def cache_root() -> Path:
    env = os.environ.get("BESA_STE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "besa-rs" / "ste"


def _wheel_cuda_roots() -> list[Path]:
    """``nvidia/cu*`` folders of the pip-installed CUDA toolkit wheels."""
    roots = []
    import site
    import sys

    paths = [*sys.path, *site.getsitepackages()]
    for p in paths:
        base = Path(p) / "nvidia"
        if base.is_dir():
            roots.extend(sorted(base.glob("cu*"), reverse=True))
            # older layout: nvidia/cuda_nvcc, nvidia/cuda_runtime
            if (base / "cuda_nvcc" / "bin" / "nvcc").exists():
                roots.append(base / "cuda_nvcc")
    return roots


def _assemble_cuda_home(root: Path) -> Path:
    """A CUDA_HOME with bin/, include/, nvvm/ and lib64/libcudart.so pointing into ``root``."""
    cudart = sorted((root / "lib").glob("libcudart.so*"))
    if not cudart:
        raise ExtensionBuildError(f"no libcudart.so* under {root / 'lib'}")
    home = cache_root() / ("cuda-home-" + hashlib.sha1(str(root).encode()).hexdigest()[:10])
    lib64 = home / "lib64"
    lib64.mkdir(parents=True, exist_ok=True)
    for name in ("bin", "include", "nvvm"):
        link = home / name
        if not link.exists():
            try:
                link.symlink_to(root / name)
            except FileExistsError:
                pass
    target = lib64 / "libcudart.so"
    if not target.exists():
        try:
            target.symlink_to(cudart[-1])
        except FileExistsError:
            pass
    return home


def find_cuda_home() -> Path | None:
    """A usable CUDA toolkit root (``bin/nvcc`` and ``include/cuda_runtime.h``), or None."""

    def ok(p: Path) -> bool:
        return (p / "bin" / "nvcc").exists() and (p / "include" / "cuda_runtime.h").exists()

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and ok(Path(env)) and (Path(env) / "lib64").exists():
        return Path(env)
    nvcc = shutil.which("nvcc")
    if nvcc:
        p = Path(nvcc).resolve().parent.parent
        if ok(p) and ((p / "lib64").exists() or (p / "lib" / "libcudart.so").exists()):
            return p
    if Path("/usr/local/cuda/bin/nvcc").exists() and ok(Path("/usr/local/cuda")):
        return Path("/usr/local/cuda")
    for root in _wheel_cuda_roots():
        if ok(root):
            return _assemble_cuda_home(root)
    return None


def _arch_list() -> str:
    env = os.environ.get("BESA_STE_CUDA_ARCH")
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        return ";".join(f"{a}.{b}" for a, b in caps)
    return "9.0"  # H100/H200 (what the GPU checks run on); override with BESA_STE_CUDA_ARCH


def build_key(arch: str) -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((_CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{arch}".encode())
    return h.hexdigest()[:16]


def build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse the cached build of) the extension and import it.

    Works without a GPU; raises :class:`ExtensionBuildError` with the reason when it cannot.
    """
    with _LOCK:
        mod = _STATE.get("module")
        if isinstance(mod, ModuleType):
            return mod
        if torch.version.cuda is None:
            raise ExtensionBuildError("this torch build has no CUDA support")
        home = find_cuda_home()
        if home is None:
            raise ExtensionBuildError(
                "nvcc not found (set CUDA_HOME or install nvidia-cuda-nvcc matching torch's CUDA)"
            )
        arch = _arch_list()
        key = build_key(arch)
        build_dir = cache_root() / f"build-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils import cpp_extension

        old_env = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
        old_home = cpp_extension.CUDA_HOME
        os.environ["CUDA_HOME"] = str(home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        cpp_extension.CUDA_HOME = str(home)
        try:
            mod = cpp_extension.load(
                name=f"besa_ste_{key}",
                sources=[str(_CSRC / s) for s in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O2"],
                extra_cuda_cflags=["-O3"],
                verbose=verbose,
            )
        except Exception as exc:  # compiler errors come as RuntimeError/CalledProcessError
            raise ExtensionBuildError(f"building the CUDA extension failed: {exc}") from exc
        finally:
            cpp_extension.CUDA_HOME = old_home
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _STATE["module"] = mod
        return mod


def load() -> ModuleType | None:
    """The extension for runtime use, or None (CUDA unavailable or build failed: warns once)."""
    mod = _STATE.get("module")
    if isinstance(mod, ModuleType):
        return mod
    if _STATE.get("failed") or not torch.cuda.is_available():
        return None
    try:
        return build()
    except ExtensionBuildError as exc:
        _STATE["failed"] = True
        warnings.warn(
            f"besa_rs.ste: {exc}; using the PyTorch fallback for the straight-through mask",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

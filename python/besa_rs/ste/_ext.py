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
import sys
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
    """A usable CUDA toolkit root (``bin/nvcc`` and ``include/cuda_runtime.h``), or None.

    Order: ``$CUDA_HOME``/``$CUDA_PATH``, the ``nvidia-cuda-nvcc`` wheels installed with torch
    (same CUDA version as torch), an ``nvcc`` on ``PATH``, ``/usr/local/cuda``.
    """

    def ok(p: Path) -> bool:
        return (p / "bin" / "nvcc").exists() and (p / "include" / "cuda_runtime.h").exists()

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and ok(Path(env)) and (Path(env) / "lib64").exists():
        return Path(env)
    # the pip wheels pinned next to torch match its CUDA version; a system toolkit may not
    for root in _wheel_cuda_roots():
        if ok(root):
            return _assemble_cuda_home(root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        p = Path(nvcc).resolve().parent.parent
        if ok(p) and ((p / "lib64").exists() or (p / "lib" / "libcudart.so").exists()):
            return p
    if Path("/usr/local/cuda/bin/nvcc").exists() and ok(Path("/usr/local/cuda")):
        return Path("/usr/local/cuda")
    return None


def _tool_dirs() -> list[str]:
    """Folders holding ninja (pip's ``ninja`` package or the interpreter's bin/)."""
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja  # type: ignore[import-untyped]

        dirs.insert(0, str(ninja.BIN_DIR))
    except ImportError:
        pass
    return dirs


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
        try:
            home = find_cuda_home()
        except OSError as exc:
            raise ExtensionBuildError(
                f"cannot prepare CUDA_HOME under {cache_root()}: {exc}"
            ) from exc
        if home is None:
            raise ExtensionBuildError(
                "nvcc not found (set CUDA_HOME or install nvidia-cuda-nvcc matching torch's CUDA)"
            )
        arch = _arch_list()
        key = build_key(arch)
        build_dir = cache_root() / f"build-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils import cpp_extension

        old_env = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "PATH")}
        old_home = cpp_extension.CUDA_HOME
        os.environ["CUDA_HOME"] = str(home)
        os.environ["PATH"] = os.pathsep.join([*_tool_dirs(), os.environ.get("PATH", "")])
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        cpp_extension.CUDA_HOME = str(home)
        try:
            name = f"besa_ste_{key}"
            cpp_extension.load(
                name=name,
                sources=[str(_CSRC / s) for s in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O2"],
                extra_cuda_cflags=["-O3"],
                is_python_module=False,  # operators registered with TORCH_LIBRARY
                verbose=verbose,
            )
            ops = getattr(torch.ops, name)
            mod = ModuleType(name, "besa-rs fused straight-through mask (CUDA operators)")
            mod.forward = ops.forward  # type: ignore[attr-defined]
            mod.backward = ops.backward  # type: ignore[attr-defined]
            mod.prune_rows = ops.prune_rows  # type: ignore[attr-defined]
            mod.__file__ = str(build_dir / f"{name}.so")
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
    except (ExtensionBuildError, OSError) as exc:  # OSError: e.g. cache folder not writable
        _STATE["failed"] = True
        warnings.warn(
            f"besa_rs.ste: {exc}; using the PyTorch fallback for the straight-through mask",
            RuntimeWarning,
            stacklevel=2,
        )
        return None

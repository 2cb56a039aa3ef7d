"""Compressed sparse checkpoints: ``pack``, ``unpack``, ``load_packed``, ``from_packed``.

All heavy work runs in Rust (``besa_rs._native``, crate ``besa-sparse``) with the GIL released:
the input is memory-mapped, every output file is written in place and the output directory is
renamed into place only when complete. See ``docs/formats.md`` for the byte layouts and the
zero policy (``-0.0`` weights are zeros and come back as ``+0.0``; NaN is kept).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _native
from ._table import format_table, human_bytes
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# The packed formats as the Rust codecs list them: canonical names, and every accepted
# spelling (config.json names, aliases) mapped to its canonical name.
FORMATS: tuple[str, ...] = tuple(name for name, _, _ in _native.formats())
_FORMAT_NAMES: dict[str, str] = {
    spelling: name
    for name, config_name, aliases in _native.formats()
    for spelling in (name, config_name, *aliases)
}
DEFAULT_SHARD_SIZE = 5_000_000_000

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``1GiB`` / ``123`` -> bytes (as ``save_pretrained``'s max_shard_size)."""
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"invalid size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ConfigError(f"shard size must be positive, got {size!r}")
    return n


def _check_format(format: str) -> str:
    """The canonical name of a format given by any accepted spelling."""
    if format not in _FORMAT_NAMES:
        raise ConfigError(f"unknown format {format!r} (expected one of: {', '.join(FORMATS)})")
    return _FORMAT_NAMES[format]


def pack(
    model_or_path: Any,
    out: str | os.PathLike[str],
    format: str = "bitmask",
    *,
    min_sparsity: float = 0.25,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    force_24: bool = False,
    tensors: list[str] | None = None,
    sync: bool = True,
) -> dict[str, Any]:
    """Packs ``model_or_path`` into ``out``: a checkpoint directory or a safetensors file, or
    in memory a transformers model (e.g. right after :func:`besa_rs.prune`; saved with
    ``save_pretrained``, config included) or a state dict (name -> torch tensor or numpy array;
    saved as one safetensors file), written first to a temporary directory next to ``out``.
    Returns the report (per tensor: action, format, sizes, ratio; totals; warnings)."""
    format = _check_format(format)
    size = parse_size(shard_size)
    if isinstance(model_or_path, (str, os.PathLike)):
        return _native.pack(
            os.fspath(model_or_path),
            os.fspath(out),
            format=format,
            min_sparsity=float(min_sparsity),
            shard_size=size,
            overwrite=overwrite,
            force_24=force_24,
            tensors=tensors,
            sync=sync,
        )
    is_model = hasattr(model_or_path, "save_pretrained")
    if not is_model and not isinstance(model_or_path, Mapping):
        raise ConfigError(
            "pack() takes a model directory, a safetensors file, a transformers model or a "
            f"state dict, got {type(model_or_path).__name__}"
        )
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".besa-pack-", dir=out_path.parent) as tmp:
        if is_model:
            model_or_path.save_pretrained(tmp, safe_serialization=True)
            src = tmp
        else:
            src = _save_state_dict(model_or_path, Path(tmp) / "model.safetensors")
        report = pack(
            src,
            out,
            format,
            min_sparsity=min_sparsity,
            shard_size=size,
            overwrite=overwrite,
            force_24=force_24,
            tensors=tensors,
            sync=sync,
        )
    report["source"] = type(model_or_path).__name__
    return report


def _save_state_dict(state: Mapping[str, Any], path: Path) -> str:
    """Writes a state dict (torch tensors or numpy arrays, any device) as one safetensors file;
    tensors sharing storage (tied weights) are written once each."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"pack(): state dict entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        t = value.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()  # safetensors refuses shared storage
        seen.add(key)
        tensors[name] = t
    save_file(tensors, str(path))
    return str(path)


def unpack(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    sync: bool = True,
) -> dict[str, Any]:
    """Decodes a packed checkpoint back into a plain Hugging Face checkpoint at ``out``."""
    return _native.unpack(
        os.fspath(path),
        os.fspath(out),
        shard_size=parse_size(shard_size),
        overwrite=overwrite,
        sync=sync,
    )


def load_packed(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads a packed (or plain) checkpoint into a dense state dict of CPU torch tensors,
    decoding in Rust directly into the tensors' memory; checksums are verified."""
    import numpy as np
    import torch

    from .dtypes import torch_dtype

    reader = _native.PackedReader(os.fspath(path))
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, _fmt, nbytes in reader.tensors():
        buf = np.empty(nbytes, dtype=np.uint8)
        reader.read_into(name, buf)
        t = torch.from_numpy(buf)
        if nbytes:
            t = t.view(torch_dtype(dtype))
        else:
            t = torch.empty(0, dtype=torch_dtype(dtype))
        out[name] = t.reshape(shape)
    return out


def load_packed_sparse(path: str | os.PathLike[str], layout: str = "torch") -> dict[str, Any]:
    """Like :func:`load_packed`, but 2-D packed weights come back sparse: ``layout="torch"``
    gives torch sparse CSR tensors, ``layout="scipy"`` scipy ``csr_array`` (float16/32/64)."""
    import torch

    dense = load_packed(path)
    reader = _native.PackedReader(os.fspath(path))
    packed = {name for name, _d, _s, fmt, _n in reader.tensors() if fmt is not None}
    out: dict[str, Any] = {}
    for name, t in dense.items():
        if name not in packed:
            out[name] = t
        elif layout == "torch":
            out[name] = t.to_sparse_csr()
        elif layout == "scipy":
            import scipy.sparse

            arr = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            out[name] = scipy.sparse.csr_array(arr)
        else:
            raise ConfigError(f"layout must be 'torch' or 'scipy', got {layout!r}")
    return out


def from_packed(path: str | os.PathLike[str], torch_dtype: Any = None) -> Any:
    """Builds the transformers model of a packed checkpoint from its config.json (without the
    quantization_config) and loads the state dict decoded in Rust into it; no dense files are
    written. Tied weights (lm_head / embeddings) are re-tied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .errors import BesaError, FormatError, MissingFileError, ModelError

    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise MissingFileError(f"{cfg_path}: no config.json; from_packed needs a model directory")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{cfg_path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg_dict, dict):
        raise FormatError(f"{cfg_path}: must hold a JSON object, found {type(cfg_dict).__name__}")
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ModelError(f"{cfg_path}: no model_type")
    state = load_packed(root)
    try:
        with tempfile.TemporaryDirectory(prefix="besa-cfg-") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(cfg_dict))
            config = AutoConfig.from_pretrained(tmp)
        dtype = torch_dtype
        if dtype is None:
            floats = [t.dtype for t in state.values() if t.is_floating_point()]
            dtype = floats[0] if floats else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # noqa: BLE001 - any failure to build from a user's config.json
        if isinstance(e, BesaError):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "mismatch" in ln), lines[0] if lines else "")
        raise ModelError(
            f"{root}: config.json does not describe the stored tensors: {first or type(e).__name__}"
        ) from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    real_missing = [k for k in missing if k not in tied and not k.startswith("lm_head")]
    if unexpected or real_missing:
        raise ModelError(
            f"{root}: state dict does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.eval()
    return model


def format_report(report: dict[str, Any], per_tensor: bool = True) -> str:
    """The pack/unpack report as text tables."""
    parts = []
    if per_tensor:
        rows = [
            [
                t["name"],
                t["action"],
                t["format"] or "-",
                t["dtype"],
                "x".join(map(str, t["shape"])) or "scalar",
                "-" if t["sparsity"] is None else f"{100 * t['sparsity']:.2f}%",
                human_bytes(t["dense_bytes"]),
                human_bytes(t["stored_bytes"]),
                f"{t['ratio']:.3f}",
            ]
            for t in report["tensors"]
        ]
        parts.append(
            format_table(
                [
                    "tensor",
                    "action",
                    "format",
                    "dtype",
                    "shape",
                    "zeros",
                    "dense",
                    "stored",
                    "ratio",
                ],
                rows,
            )
        )
    tt = report["totals"]
    parts.append(
        f"{report['source']} -> {report['out']} ({report['format']}): {tt['packed']} packed, "
        f"{tt['copied']} copied; tensors {human_bytes(tt['dense_bytes'])} -> {human_bytes(tt['stored_bytes'])}; "
        f"files {human_bytes(tt['input_file_bytes'])} -> {human_bytes(tt['output_file_bytes'])} "
        f"(ratio {tt['ratio']:.4f}) in {len(report['files'])} file(s)"
    )
    for w in report.get("warnings", []):
        parts.append(f"WARNING: {w}")
    return "\n\n".join(parts)


__all__ = [
    "FORMATS",
    "format_report",
    "from_packed",
    "load_packed",
    "load_packed_sparse",
    "pack",
    "parse_size",
    "unpack",
]

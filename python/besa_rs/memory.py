"""In-memory conversion of one dense 2-D weight: ``compress`` into the named parts of a packed
format and ``decompress`` back, in Rust (``besa_sparse::memory``, the codecs of ``pack``).

- Inputs: numpy arrays (float16, float32, float64) and CPU torch tensors (float16, bfloat16,
  float32, float64). Numpy has no bfloat16: torch bf16 tensors are read through an int16 view
  of their memory. The input buffer is borrowed, never copied; it must be C-contiguous (a
  non-contiguous input is refused with a ``ShapeError``: call ``.contiguous()`` /
  ``np.ascontiguousarray`` yourself if a copy is what you want).
- Outputs follow the input type (numpy in, numpy out; torch in, torch out). Each part is
  allocated once at its final size and filled by Rust with the GIL released (rows in parallel,
  rayon; ``RAYON_NUM_THREADS`` sets the thread count).
- Part names are those of ``pack``'s files and of compressed-tensors where the format has them:
  bitmask ``shape``, ``compressed``, ``bitmask``, ``row_offsets``; 2:4 ``shape`` (``[2, 1]``),
  ``compressed`` (``[rows, cols/2]``), ``bitmask``; CSR ``shape``, ``crow_indices``,
  ``col_indices``, ``values``. The bytes are identical to what ``pack`` writes for the matrix.
- Zeros follow the project's rule (``docs/formats.md``): ``-0.0`` is a zero, not stored, and
  comes back as ``+0.0``; NaN and infinities are kept bit for bit.
- Matrices with 0 rows or 0 columns are accepted and round-trip (parts of size 0).
- Errors are one-line :class:`~besa_rs.errors.BesaError` subclasses: ``DtypeError`` (integer,
  complex, bool... inputs; non-float values part), ``ShapeError`` (not 2-D, not contiguous, 2:4
  pattern violated), ``ConfigError`` (unknown format, not an array, CUDA / sparse / meta
  tensor), ``FormatError`` (parts that are inconsistent, truncated or hostile: the same checks a
  packed file gets).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt

from . import _native, dtypes
from .errors import ConfigError, DtypeError, FormatError, ShapeError

if TYPE_CHECKING:
    import torch


def _torch_module() -> Any:
    """torch, when it is already imported (a torch tensor can only exist then)."""
    return sys.modules.get("torch")


def _is_torch(x: object) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_bytes(t: torch.Tensor, what: str) -> tuple[npt.NDArray[np.uint8], str]:
    """A flat uint8 numpy view of a CPU torch tensor's memory and its dtype name (no copy)."""
    if t.device.type != "cpu":
        raise ConfigError(f"{what} is on {t.device}; only CPU tensors are supported (use .cpu())")
    if t.layout != _torch_module().strided:
        raise ConfigError(f"{what} is a {t.layout} tensor; a dense (strided) tensor is needed")
    name = dtypes.name_of(t.dtype)
    if name is None:
        raise DtypeError(f"{what} has dtype {t.dtype}, which has no packed equivalent")
    if not t.is_contiguous():
        raise ShapeError(
            f"{what} is not contiguous (strides {tuple(t.stride())}); besa-rs borrows the "
            "buffer without copying: pass t.contiguous()"
        )
    flat = t.detach().reshape(-1)
    if t.element_size() != 1:
        flat = flat.view(_torch_module().uint8)
    return flat.numpy(), name


def _numpy_bytes(a: npt.NDArray[Any], what: str) -> tuple[npt.NDArray[np.uint8], str]:
    """A flat uint8 view of a numpy array's memory and its dtype name (no copy)."""
    name = dtypes.name_of(a.dtype)
    if name is None:
        raise DtypeError(
            f"{what} has dtype {a.dtype}, which has no packed equivalent"
            + (" (byte order must be little-endian)" if a.dtype.byteorder == ">" else "")
        )
    if not a.flags.c_contiguous:
        raise ShapeError(
            f"{what} is not C-contiguous (strides {a.strides}); besa-rs borrows the buffer "
            "without copying: pass np.ascontiguousarray(a)"
        )
    return a.reshape(-1).view(np.uint8), name


def _matrix(x: object) -> tuple[npt.NDArray[np.uint8], str, int, int, bool]:
    """(bytes, dtype name, rows, cols, is torch) of a dense matrix to compress."""
    if _is_torch(x):
        t: torch.Tensor = x  # type: ignore[assignment]
        data, name = _torch_bytes(t, "the tensor")
        shape, torch_in = tuple(t.shape), True
    elif isinstance(x, np.ndarray):
        data, name = _numpy_bytes(x, "the array")
        shape, torch_in = x.shape, False
    else:
        raise ConfigError(
            f"compress() takes a numpy array or a torch tensor, got {type(x).__name__}"
        )
    if name not in dtypes.FLOATS:
        raise DtypeError(
            f"dtype {getattr(x, 'dtype', name)} cannot be compressed "
            "(only float16, bfloat16, float32, float64)"
        )
    if len(shape) != 2:
        raise ShapeError(f"compress() takes a 2-D matrix, got shape {list(shape)}")
    return data, name, shape[0], shape[1], torch_in


def _view(buf: npt.NDArray[np.uint8], dtype: str, shape: Sequence[int], torch_out: bool) -> Any:
    """The flat byte array ``buf`` seen as ``dtype`` ``shape`` (numpy or torch, no copy)."""
    if not torch_out:
        return buf.view(dtypes.numpy_dtype(dtype)).reshape(shape)
    torch = _torch_module()
    tdtype = dtypes.torch_dtype(dtype)
    t = torch.from_numpy(buf)
    if buf.size == 0:
        return torch.empty(tuple(shape), dtype=tdtype)
    return t.view(tdtype).reshape(tuple(shape))


@overload
def compress(
    tensor: torch.Tensor, format: str = ..., *, force_24: bool = ...
) -> dict[str, torch.Tensor]: ...
@overload
def compress(
    tensor: npt.NDArray[Any], format: str = ..., *, force_24: bool = ...
) -> dict[str, npt.NDArray[Any]]: ...
def compress(tensor: Any, format: str = "bitmask", *, force_24: bool = False) -> dict[str, Any]:
    """Compresses a dense 2-D matrix into the named parts of ``format`` (``bitmask``, ``2:4``,
    ``csr`` or any accepted alias), in the format's order, as numpy arrays or torch tensors like
    the input. ``force_24``: for ``2:4``, re-prune groups of 4 keeping more than 2 by magnitude
    instead of refusing the matrix."""
    data, dtype, rows, cols, torch_in = _matrix(tensor)
    parts = _native.compress_parts(data, dtype, rows, cols, format, force_24=force_24)
    return {name: _view(buf, dt, shape, torch_in) for name, dt, shape, buf in parts}


def _part(name: str, x: object) -> tuple[npt.NDArray[np.uint8], str, list[int], bool]:
    """(bytes, dtype name, shape, is torch) of one part given to ``decompress``."""
    what = f"part {name!r}"
    if _is_torch(x):
        t: torch.Tensor = x  # type: ignore[assignment]
        data, dtype = _torch_bytes(t, what)
        return data, dtype, list(t.shape), True
    if isinstance(x, np.ndarray):
        data, dtype = _numpy_bytes(x, what)
        return data, dtype, list(x.shape), False
    if name == "shape" and isinstance(x, (list, tuple)):
        # compressed-tensors accepts the dense shape as a plain list too.
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in x):
            raise FormatError(f"part 'shape' must hold integers, got {list(x)!r}")
        arr = np.asarray(x, dtype="<i8")
        return arr.view(np.uint8), "I64", list(arr.shape), False
    raise ConfigError(f"{what} must be a numpy array or a torch tensor, got {type(x).__name__}")


@overload
def decompress(parts: Mapping[str, torch.Tensor], format: str | None = ...) -> torch.Tensor: ...
@overload
def decompress(
    parts: Mapping[str, npt.NDArray[Any]], format: str | None = ...
) -> npt.NDArray[Any]: ...
@overload
def decompress(parts: Mapping[str, Any], format: str | None = ...) -> Any: ...
def decompress(parts: Mapping[str, Any], format: str | None = None) -> Any:
    """Decodes the named parts of one matrix (as :func:`compress` returns them, or as
    compressed-tensors / ``pack`` store them, without the module prefix) into the dense 2-D
    matrix. The format is recognised from the part names unless given. The parts are checked
    like a packed file's (names, dtypes, shapes, byte lengths, bitmask popcounts, offsets, CSR
    indices) before anything is decoded. Returns a torch tensor when any part is one, else a
    numpy array (bfloat16 values come as torch tensors: numpy has no bfloat16)."""
    if not isinstance(parts, Mapping):
        raise ConfigError(
            f"decompress() takes a mapping of part name -> array, got {type(parts).__name__}"
        )
    given = []
    torch_out = False
    for name, value in parts.items():
        if not isinstance(name, str):
            raise ConfigError(f"part names must be strings, got {name!r}")
        data, dtype, shape, is_torch = _part(name, value)
        given.append((name, dtype, shape, data))
        torch_out = torch_out or is_torch
    _fmt, (_, dtype, shape, buf) = _native.decompress_parts(given, format)
    return _view(buf, dtype, shape, torch_out)


__all__ = ["compress", "decompress"]

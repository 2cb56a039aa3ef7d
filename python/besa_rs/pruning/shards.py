"""Safetensors files written tensor by tensor.

A safetensors file is an 8-byte header length, a JSON header naming every tensor's dtype, shape
and byte range, then the raw bytes. When every tensor's dtype and shape are known in advance the
whole header is too, so the file can be laid out before any tensor exists (:class:`FileLayout`),
created at its final size, and each tensor written at its offset when it is ready
(:class:`ShardWriter`): a model's output shards are filled block by block without ever holding
more than one block in memory.

The layout is the one ``safetensors.torch.save_file`` produces (tensors ordered by dtype, largest
first, then by name; compact JSON with ``__metadata__`` first; header padded with spaces to a
multiple of 8 bytes), so a file filled completely is byte for byte the file ``save_file`` writes
for the same tensors and metadata (``save_file`` orders several metadata keys arbitrarily; with
one key, as in a model's shards, the bytes are the same).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dtypes
from ..errors import BesaIOError, FormatError, ShapeError

#: torch dtype -> safetensors dtype name (the dtypes this torch has)
DTYPE_NAMES: dict[torch.dtype, str] = {
    getattr(torch, attr): name for name, attr in dtypes.TORCH.items() if hasattr(torch, attr)
}
#: safetensors' own dtype order (its ``Dtype`` enum); tensors are stored highest first
_ORDER = list(dtypes.TORCH)


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


class FileLayout:
    """Where each tensor of one safetensors file goes, computed from ``{name: (dtype, shape)}``
    and the file's string metadata."""

    def __init__(
        self,
        tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        for name, (dtype, _) in tensors.items():
            if dtype not in DTYPE_NAMES:
                raise FormatError(f"tensor {name!r}: dtype {dtype} cannot be written")
        order = sorted(tensors, key=lambda n: (-_ORDER.index(DTYPE_NAMES[tensors[n][0]]), n))
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self.entries: dict[str, Entry] = {}
        offset = 0
        for name in order:
            dtype, shape = tensors[name]
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            self.entries[name] = Entry(name, dtype, tuple(shape), offset, offset + nbytes)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        self.data_start = len(self.header)
        self.size = self.data_start + offset


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class ShardWriter:
    """An open safetensors file of a :class:`FileLayout`, filled with :meth:`write`.

    ``create`` makes the file at its final size (header written, data section still holes);
    otherwise the file must already exist with exactly this layout (a resumed run)."""

    def __init__(self, path: str | os.PathLike[str], layout: FileLayout, create: bool):
        self.path = Path(path)
        self.layout = layout
        if create:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            except OSError as e:
                raise BesaIOError(f"cannot write {self.path}: {e.strerror}") from None
            try:
                _pwrite_all(self.fd, memoryview(layout.header), 0)
                os.ftruncate(self.fd, layout.size)
                # the space is taken now: a disk too small fails before any block is pruned
                if layout.size > len(layout.header) and hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(self.fd, 0, layout.size)
            except OSError as e:
                os.close(self.fd)
                raise BesaIOError(f"cannot write {self.path}: {e.strerror}") from None
            except BaseException:
                os.close(self.fd)
                raise
            return
        try:
            self.fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise FormatError(f"{self.path}: missing from the checkpoint") from None
        try:
            ok = os.fstat(self.fd).st_size == layout.size and os.pread(
                self.fd, len(layout.header), 0
            ) == bytes(layout.header)
        except OSError:
            ok = False
        if not ok:
            os.close(self.fd)
            raise FormatError(
                f"{self.path}: does not match this run's output layout (the checkpoint is "
                "damaged or from another model); start over with --overwrite"
            )

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes ``tensor`` (any device) at its place; its dtype and shape must be the layout's."""
        e = self.layout.entries.get(name)
        if e is None:
            raise FormatError(f"{self.path}: no tensor {name!r} in this file's layout")
        if tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise ShapeError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"expected {e.dtype} {list(e.shape)}"
            )
        if e.end == e.start:
            return
        t = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            _pwrite_all(self.fd, t.numpy().data, self.layout.data_start + e.start)
        except OSError as err:
            raise BesaIOError(f"cannot write {self.path}: {err.strerror}") from None

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise BesaIOError(f"cannot write {self.path}: {err.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n

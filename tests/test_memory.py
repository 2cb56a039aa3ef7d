"""In-memory conversion: ``besa_rs.compress`` / ``besa_rs.decompress`` (besa_rs.memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import besa_rs
from besa_rs import memory
from besa_rs.errors import BesaError, ConfigError, DtypeError, FormatError, ShapeError
from besa_rs.memory import compress, decompress
from besa_rs.packing import pack

FORMATS = ["bitmask", "2:4", "csr"]
PARTS = {
    "bitmask": ["shape", "compressed", "bitmask", "row_offsets"],
    "2:4": ["shape", "compressed", "bitmask"],
    "csr": ["shape", "crow_indices", "col_indices", "values"],
}
NP_DTYPES = [np.float16, np.float32, np.float64]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _weights(rows: int, cols: int, fmt: str, seed: int = 0, density: float = 0.5) -> torch.Tensor:
    """A float32 matrix with ``-0.0`` for zeros, a NaN and an infinity among the kept values;
    2:4-shaped (some groups keeping fewer than 2) for the 2:4 format."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if fmt == "2:4":
        idx = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, idx, True)
        keep = keep.reshape(rows, cols)
        if rows > 1:
            keep[1, :4] = torch.tensor([True, False, False, False])  # a group keeping 1
    else:
        keep = torch.rand(rows, cols, generator=g) < density
        if rows > 2:
            keep[2] = False  # an empty row
    w = torch.where(keep, w, torch.full_like(w, -0.0))
    if rows * cols >= 8:
        flat = w.view(-1)
        kept = keep.view(-1).nonzero().flatten()
        flat[kept[0]] = float("nan")
        flat[kept[-1]] = float("inf")
    return w


def _canonical_bits_np(a: np.ndarray) -> np.ndarray:
    """The bits a round trip must give back: every zero (+0 or -0) as +0."""
    bits = a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]).copy()
    bits[a == 0] = 0
    return bits


def _canonical_bits_torch(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.view(ints).clone()
    bits[t == 0] = 0
    return bits


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_numpy_round_trip(fmt, dtype):
    a = _weights(24, 40, fmt).numpy().astype(dtype)
    parts = compress(a, fmt)
    assert list(parts) == PARTS[fmt]
    assert all(isinstance(p, np.ndarray) for p in parts.values())
    back = decompress(parts)
    assert isinstance(back, np.ndarray) and back.dtype == a.dtype and back.shape == a.shape
    assert np.array_equal(back.view(_canonical_bits_np(a).dtype), _canonical_bits_np(a))
    assert np.array_equal(decompress(parts, fmt), back, equal_nan=True)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_round_trip(fmt, dtype):
    t = _weights(24, 40, fmt).to(dtype)
    parts = compress(t, fmt)
    assert list(parts) == PARTS[fmt]
    assert all(isinstance(p, torch.Tensor) for p in parts.values())
    back = decompress(parts)
    assert isinstance(back, torch.Tensor) and back.dtype == dtype and back.shape == t.shape
    assert torch.equal(_canonical_bits_torch(back), _canonical_bits_torch(t))
    # the bits, not only the values: no -0.0 comes back
    assert not torch.signbit(back[back == 0]).any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_part_dtypes_and_shapes(fmt):
    t = _weights(8, 16, fmt).to(torch.bfloat16)
    parts = compress(t, fmt)
    nnz = int((t != 0).sum())
    want = {
        "bitmask": {
            "shape": (torch.int64, (2,)),
            "compressed": (torch.bfloat16, (nnz,)),
            "bitmask": (torch.uint8, (8, 2)),
            "row_offsets": (torch.int64, (8,)),
        },
        "2:4": {
            "shape": (torch.int64, (2, 1)),
            "compressed": (torch.bfloat16, (8, 8)),
            "bitmask": (torch.uint8, (8, 2)),
        },
        "csr": {
            "shape": (torch.int64, (2,)),
            "crow_indices": (torch.int64, (9,)),
            "col_indices": (torch.int32, (nnz,)),
            "values": (torch.bfloat16, (nnz,)),
        },
    }[fmt]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in parts.items()} == want
    assert parts["shape"].flatten().tolist() == [8, 16]


def test_exported_from_the_package():
    assert besa_rs.compress is compress and besa_rs.decompress is decompress
    assert {"compress", "decompress"} <= set(besa_rs.__all__)


def test_aliases_and_explicit_format():
    a = _weights(4, 8, "2:4").numpy()
    assert list(compress(a, "sparse-24-bitmask")) == PARTS["2:4"]
    parts = compress(a, "sparse-bitmask")
    assert np.array_equal(decompress(parts, "bitmask"), decompress(parts), equal_nan=True)


# --- edge shapes, all-zero, all-kept, zeros ----------------------------------------------


@pytest.mark.parametrize("shape", [(1, 24), (24, 1), (0, 8), (8, 0), (0, 0), (1, 1), (3, 9)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_shapes(fmt, shape):
    rows, cols = shape
    idx = np.arange(rows * cols, dtype=np.float32).reshape(shape)
    a = np.where(idx % 3 == 0, idx + 1, np.float32(-0.0)).astype(np.float32)
    if fmt == "2:4" and cols % 4:
        with pytest.raises(ShapeError, match="not divisible by 4"):
            compress(a, fmt)
        return
    for x in (a, torch.from_numpy(a)):
        parts = compress(x, fmt)
        back = decompress(parts)
        assert tuple(back.shape) == shape
        assert np.array_equal(np.asarray(back), a)
        assert not np.signbit(np.asarray(back)).any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero(fmt):
    a = np.zeros((6, 16), np.float16)
    a[::2] = -0.0
    parts = compress(a, fmt)
    if fmt == "bitmask":
        assert parts["compressed"].size == 0 and not parts["bitmask"].any()
        assert not parts["row_offsets"].any()
    elif fmt == "csr":
        assert parts["values"].size == 0 and not parts["crow_indices"].any()
    else:
        # 2:4 stores exactly two per group: +0.0 fillers at the first two positions
        assert (parts["bitmask"] == 0x33).all()
        assert not parts["compressed"].view(np.uint16).any()
    back = decompress(parts)
    assert not back.view(np.uint16).any()


@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_all_kept(fmt):
    a = np.arange(1, 1 + 5 * 12, dtype=np.float32).reshape(5, 12) * -1.5
    parts = compress(a, fmt)
    values = parts["compressed" if fmt == "bitmask" else "values"]
    assert np.array_equal(values, a.ravel())
    if fmt == "bitmask":
        assert parts["bitmask"].tolist() == [[0xFF, 0x0F]] * 5
        assert parts["row_offsets"].tolist() == [0, 12, 24, 36, 48]
    else:
        assert parts["col_indices"].tolist() == list(range(12)) * 5
    assert np.array_equal(decompress(parts), a)


def test_two_four_dense_needs_force():
    a = np.arange(1, 33, dtype=np.float32).reshape(4, 8)
    with pytest.raises(ShapeError, match="not 2:4 sparse: row 0, columns 0..3 keep 4 of 4"):
        compress(a, "2:4")
    parts = compress(a, "2:4", force_24=True)
    back = decompress(parts)
    # the two largest magnitudes of each group of 4 are kept
    want = a.copy()
    want[:, [0, 1, 4, 5]] = 0
    assert np.array_equal(back, want)


def test_negative_zero_and_nan_bits():
    bits = np.array([[0x8000, 0x7E01, 0xFE00, 0x0001, 0x8001, 0x0000, 0x7C00, 0xFC00]], np.uint16)
    a = bits.view(np.float16)
    want = bits.copy()
    want[0, [0, 5]] = 0
    for fmt in ["bitmask", "csr"]:
        back = decompress(compress(a, fmt)).view(np.uint16)
        assert back.tolist() == want.tolist(), fmt
    # 2:4: the kept pair of each group comes back bit for bit, the rest as +0.0
    b24 = np.array([[0x8000, 0x7E01, 0x0000, 0xFC00]], np.uint16)
    back = decompress(compress(b24.view(np.float16), "2:4")).view(np.uint16)
    assert back.tolist() == [[0, 0x7E01, 0, 0xFC00]]
    t = torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)
    parts = compress(t, "bitmask")
    assert parts["compressed"].numel() == 6  # -0.0 and +0.0 are not stored
    assert decompress(parts).view(torch.int16)[0, 0].item() == 0


# --- the same bytes as `besa-rs pack`, and compressed-tensors interop --------------------


def _module_dir(tmp_path, fmt, dtype):
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    # sparse enough that every format packs (CSR is only smaller below ~33% density)
    tensors = {
        n: _weights(16 + 8 * i, 32, fmt, seed=i, density=0.2).to(dtype) for i, n in enumerate(names)
    }
    d = tmp_path / "m"
    d.mkdir()
    full = dict(tensors)
    full["model.norm.weight"] = torch.ones(32, dtype=dtype)
    save_file(full, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_parts_equal_what_pack_writes(tmp_path, fmt, dtype):
    d, tensors = _module_dir(tmp_path, fmt, dtype)
    report = pack(d, tmp_path / "p", fmt, sync=False)
    assert report["totals"]["packed"] == len(tensors)
    stored = load_file(tmp_path / "p" / "model.safetensors")
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        parts = compress(w, fmt)
        for suffix, part in parts.items():
            on_disk = stored[f"{module}.{suffix}"]
            assert part.dtype == on_disk.dtype and part.shape == on_disk.shape, (name, suffix)
            assert torch.equal(part.view(-1).view(torch.uint8), on_disk.view(-1).view(torch.uint8))
        # and the parts as stored decompress to the weight
        from_disk = {s: stored[f"{module}.{s}"] for s in PARTS[fmt]}
        assert torch.equal(_canonical_bits_torch(decompress(from_disk)), _canonical_bits_torch(w))


ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_compressed_tensors_bitmask_interop(dtype):
    from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import (
        BitmaskTensor,
        bitmask_compress,
    )

    w = _weights(24, 40, "bitmask").to(dtype)
    w[w.isnan()] = 1.0  # compressed-tensors' reference comparison below uses ==
    canon = torch.where(w == 0, torch.zeros_like(w), w)
    parts = compress(w, "bitmask")
    # their decompressor decodes our parts
    assert torch.equal(BitmaskTensor(**parts).decompress(), canon)
    # our parts are their compressor's output, tensor for tensor
    values, bitmask, row_offsets = bitmask_compress(w)
    assert torch.equal(parts["compressed"], values)
    assert torch.equal(parts["bitmask"], bitmask)
    assert torch.equal(parts["row_offsets"], row_offsets)
    # and we decode theirs (shape as compressed-tensors stores it, or as a plain list)
    theirs = BitmaskTensor.from_dense(w).dict(name_prefix="m.weight")
    theirs = {k.removeprefix("m.weight."): v for k, v in theirs.items()}
    assert torch.equal(decompress(theirs), canon)
    theirs["shape"] = list(w.shape)
    assert torch.equal(decompress(theirs), canon)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compressed_tensors_24_interop(dtype):
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
        Sparse24BitMaskTensor,
    )

    w = _weights(16, 32, "2:4").to(dtype)
    w[w.isnan()] = 1.0
    canon = torch.where(w == 0, torch.zeros_like(w), w)
    parts = compress(w, "2:4")
    assert torch.equal(Sparse24BitMaskTensor.from_compressed_data(**parts).decompress(), canon)
    theirs = Sparse24BitMaskTensor.from_dense(w).dict(name_prefix="m.weight")
    theirs = {k.removeprefix("m."): v for k, v in theirs.items()}
    assert torch.equal(decompress(theirs), canon)


# --- hostile inputs ----------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> None:
    assert isinstance(e.value, BesaError)
    assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (np.ones((4, 8), np.int32), DtypeError, "int32"),
        (np.ones((4, 8), bool), DtypeError, "bool"),
        (np.ones((4, 8), np.complex64), DtypeError, "complex64"),
        (np.ones((4, 8), ">f4"), DtypeError, "little-endian"),
        (np.ones(8, np.float32), ShapeError, r"2-D matrix, got shape \[8\]"),
        (np.ones((2, 4, 8), np.float32), ShapeError, r"got shape \[2, 4, 8\]"),
        (np.ones((8, 4), np.float32).T, ShapeError, "not C-contiguous"),
        (np.ones((8, 8), np.float32)[:, ::2], ShapeError, "not C-contiguous"),
        ([[1.0, 0.0]], ConfigError, "numpy array or a torch tensor, got list"),
        (torch.ones(4, 8, dtype=torch.int32), DtypeError, "int32"),
        (torch.ones(4, 8, dtype=torch.complex64), DtypeError, "complex64"),
        (torch.ones(8), ShapeError, r"got shape \[8\]"),
        (torch.ones(2, 4, 8), ShapeError, "2-D"),
        (torch.ones(8, 4).T, ShapeError, "not contiguous"),
        (torch.ones(4, 8).to_sparse_coo(), ConfigError, "strided"),
        (torch.ones(4, 8, device="meta"), ConfigError, "CPU tensors"),
    ],
)
def test_hostile_compress_inputs(bad, error, match):
    with pytest.raises(error, match=match) as e:
        compress(bad)
    _one_line(e)


def test_unknown_format():
    with pytest.raises(ConfigError, match="unknown pack format") as e:
        compress(np.ones((4, 8), np.float32), "sparse-4-8")
    _one_line(e)
    parts = compress(np.ones((4, 8), np.float32))
    with pytest.raises(ConfigError, match="unknown pack format") as e:
        decompress(parts, "dense")
    _one_line(e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensor_is_refused():
    with pytest.raises(ConfigError, match="cuda") as e:
        compress(torch.ones(4, 8, device="cuda"))
    _one_line(e)


def _good(fmt="bitmask"):
    return compress(_weights(6, 16, fmt), fmt)


def _hostile_parts():
    def edit(fmt, **changes):
        p = dict(_good(fmt))
        for k, v in changes.items():
            if v is None:
                del p[k]
            else:
                p[k] = v(p[k]) if callable(v) else v
        return p

    def flip(t, i=0, bit=0x02):
        t = t.clone()
        t.view(-1)[i] ^= bit
        return t

    padding = compress(torch.ones(6, 15), "bitmask")
    padding["bitmask"][2, 1] |= 0x80

    return [
        (
            "unknown names",
            {("mask" if k == "bitmask" else k): v for k, v in _good().items()},
            None,
            "not the parts of any format",
        ),
        # without row_offsets the names are those of 2:4, whose checks refuse the parts
        ("bitmask as 2:4", edit("bitmask", row_offsets=None), None, r"2:4 of \[6, 16\]"),
        ("missing part", edit("bitmask", row_offsets=None), "bitmask", 'needs part "row_offsets"'),
        ("extra part", {**_good(), "extra": torch.ones(1)}, "bitmask", "unexpected part"),
        ("wrong format", _good(), "csr", "unexpected part"),
        ("truncated values", edit("bitmask", compressed=lambda t: t[:-1]), None, "popcount"),
        (
            "shape mismatch",
            edit("bitmask", shape=torch.tensor([7, 16])),
            None,
            r"bitmask is U8 \[6, 2\]",
        ),
        ("negative shape", edit("bitmask", shape=torch.tensor([-6, 16])), None, "invalid"),
        ("shape of 3", edit("bitmask", shape=torch.tensor([6, 16, 1])), None, "2 elements"),
        ("float shape", edit("bitmask", shape=torch.tensor([6.0, 16.0])), None, "I64"),
        ("bit flipped", edit("bitmask", bitmask=flip), None, "popcount"),
        ("csr narrower", edit("csr", shape=torch.tensor([6, 15])), None, "out of range"),
        ("padding bit", padding, None, "beyond column 15"),
        ("row offsets", edit("bitmask", row_offsets=lambda t: flip(t, 1, 1)), None, "row_offsets"),
        ("2:4 group", edit("2:4", bitmask=lambda t: flip(t, 0, 0x01)), None, "exactly 2"),
        (
            "csr order",
            edit("csr", col_indices=lambda t: t.flip(0).contiguous()),
            None,
            "sorted",
        ),
        (
            "csr crow",
            edit("csr", crow_indices=lambda t: flip(t, 6, 0x40)),
            None,
            "crow_indices",
        ),
    ]


@pytest.mark.parametrize(
    ("parts", "fmt", "match"),
    [(p, f, m) for _, p, f, m in _hostile_parts()],
    ids=[n for n, *_ in _hostile_parts()],
)
def test_hostile_parts(parts, fmt, match):
    with pytest.raises(FormatError, match=match) as e:
        decompress(parts, fmt)
    _one_line(e)


def test_hostile_part_types():
    good = _good()
    with pytest.raises(DtypeError, match="F16, BF16, F32 or F64") as e:
        decompress({**good, "compressed": good["compressed"].to(torch.int32)})
    _one_line(e)
    with pytest.raises(ConfigError, match="mapping") as e:
        decompress(list(good.values()))  # type: ignore[arg-type]
    _one_line(e)
    with pytest.raises(ConfigError, match="part 'bitmask' must be a numpy array") as e:
        decompress({**good, "bitmask": good["bitmask"].tolist()})
    _one_line(e)
    with pytest.raises(FormatError, match="integers") as e:
        decompress({**good, "shape": [6.0, 16]})
    _one_line(e)
    with pytest.raises(ShapeError, match="not contiguous") as e:
        decompress({**good, "bitmask": good["bitmask"].T})
    _one_line(e)


# --- no copy of the input ----------------------------------------------------------------


def test_inputs_are_borrowed_views():
    a = np.zeros((64, 32), np.float32)
    data, *_ = memory._matrix(a)
    assert np.shares_memory(data, a)
    t = torch.zeros(64, 32, dtype=torch.bfloat16, requires_grad=True)
    data, name, *_ = memory._matrix(t)
    assert name == "BF16" and data.ctypes.data == t.data_ptr()


_RSS_SCRIPT = """
import sys
import numpy as np
import torch
from besa_rs import compress

def status(key):
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024

kind = sys.argv[1]
rows, cols = 8192, 4096
if kind == "numpy":
    x = np.zeros((rows, cols), np.float32)
    x[:, ::10] = 1.0  # 10% kept, no temporaries
    dense = x.nbytes
else:
    x = torch.zeros((rows, cols), dtype=torch.bfloat16)
    x[:, ::10] = 1.0
    dense = x.numel() * 2
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmHWM")
parts = compress(x, "bitmask")
parts_bytes = sum(p.nbytes for p in parts.values())
grow_compress = status("VmHWM") - base
del parts
print(dense, parts_bytes, grow_compress)
"""


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_compress_does_not_copy_the_input(kind):
    """Peak memory during compress stays well below one more dense copy (the parts of a 10%
    dense matrix are ~13% of it): a wrapper that copied or converted the input would fail."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_RSS_SCRIPT), kind],
        capture_output=True,
        text=True,
        env={**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    dense, parts_bytes, grow = map(int, out.stdout.split())
    assert parts_bytes < 0.2 * dense
    assert grow < parts_bytes + 0.4 * dense, (dense, parts_bytes, grow)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_csr_of_a_matrix_of_many_tasks_equals_torch(dtype):
    """Several parallel tasks (a few MB, empty rows at task ends): the same arrays as torch."""
    w = _weights(1200, 700, "csr", density=0.3).to(dtype)
    w[w.isnan()] = 1.0
    w[-40:] = 0  # trailing empty rows
    w[::97] = 0
    ref = w.to_sparse_csr()
    parts = compress(w, "csr")
    assert torch.equal(parts["crow_indices"], ref.crow_indices())
    assert torch.equal(parts["col_indices"], ref.col_indices().to(torch.int32))
    assert torch.equal(parts["values"], ref.values())
    assert torch.equal(decompress(parts), w)

"""Reference (numpy only) encoder/decoder of the two quantized packed layouts of
docs/formats.md: compressed-tensors "pack-quantized" and besa-rs "bitmask-quantized".

Test oracle for the Rust codecs (tests/test_pack_quantized.py) and the numpy baseline of the
throughput bench (benches/quant_size.py). Written from the spec, straightforwardly vectorised;
no torch. Inputs are what ``quantization.safetensors`` holds for one ``[R, C]`` weight:

* ``codes``  uint8 ``[R, C]`` unsigned codes ``q`` in ``0 .. 2^N - 1``;
* ``scale``  ``[R, G]`` in the model's dtype (``G`` groups per row, width ``C / G``); bfloat16 is
  carried as its raw ``uint16`` bits with ``dtype="BF16"`` (numpy has no bfloat16);
* ``zero``   uint8 ``[R, G]`` unsigned integer zero points ``z`` in ``0 .. 2^N - 1``.

The dequantized weight is ``(q - z) * scale`` rounded once to the model dtype (as
compressed-tensors computes it), so a pruned weight (``q == z``) is exactly ``+0.0``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

#: safetensors dtype name -> numpy dtype of its raw items (BF16 as uint16 bits)
FLOAT_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
}
#: part names in CRC order (``besa_rs.crc32.<module>`` of docs/formats.md)
PACK_QUANTIZED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
BITMASK_QUANTIZED_PARTS = ("shape", "bitmask", "codes", "weight_scale", "weight_zero_point")


class LayoutError(ValueError):
    """A part that does not follow the layout (the oracle's own structural checks)."""


# ---------------------------------------------------------------------------------------------
# bit streams: field k of a stream occupies bits k*N .. k*N+N-1, LSB first, bytes in order
def pack_stream(values: np.ndarray, bits: int, align_bits: int = 8) -> np.ndarray:
    """``values`` ``[..., n]`` (integers < 2^bits) -> uint8 ``[..., nbytes]``: each last-axis row
    is one LSB-first bit stream of ``n * bits`` bits, zero-padded to a multiple of
    ``align_bits`` (8: bytes, 32: int32 words)."""
    v = np.ascontiguousarray(values, dtype=np.uint8)
    *lead, n = v.shape
    nbits = -(-n * bits // align_bits) * align_bits
    b = np.unpackbits(v[..., None], axis=-1, count=bits, bitorder="little")
    b = b.reshape(*lead, n * bits)
    if nbits > n * bits:
        pad = np.zeros((*lead, nbits - n * bits), dtype=np.uint8)
        b = np.concatenate([b, pad], axis=-1)
    return np.packbits(b, axis=-1, bitorder="little")


def unpack_stream(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_stream`: uint8 ``[..., nbytes]`` -> uint8 ``[..., n]``. Raises
    :class:`LayoutError` when the stream is too short or a padding bit is set."""
    u = np.ascontiguousarray(buf, dtype=np.uint8)
    *lead, nbytes = u.shape
    if nbytes * 8 < n * bits:
        raise LayoutError(f"bit stream of {nbytes} bytes holds fewer than {n} {bits}-bit fields")
    # field k: a 16-bit little-endian window at byte k*N // 8, shifted by k*N % 8
    off = np.arange(n, dtype=np.int64) * bits
    padded = np.concatenate([u, np.zeros((*lead, 1), dtype=np.uint8)], axis=-1)
    lo = padded[..., off // 8].astype(np.uint16)
    hi = padded[..., off // 8 + 1].astype(np.uint16)
    window = lo | (hi << np.uint16(8))
    out = ((window >> (off % 8).astype(np.uint16)) & np.uint16((1 << bits) - 1)).astype(np.uint8)
    used = n * bits
    tail = np.unpackbits(u[..., used // 8 :], axis=-1, bitorder="little")[..., used % 8 :]
    if tail.any():
        raise LayoutError("padding bits after the last field are not zero")
    return out


# ---------------------------------------------------------------------------------------------
# dequantization exactly as compressed-tensors computes it in the scale's dtype
def _bf16_to_f32(bits16: np.ndarray) -> np.ndarray:
    return (bits16.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (finite inputs; overflow gives inf)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return r.astype(np.uint16)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, dtype: str) -> np.ndarray:
    """``(q - z) * scale`` per group, one rounding to ``dtype`` (raw uint16 bits for BF16).
    The product of an integer of at most 8 bits and a 16-bit float is exact in float32, so
    rounding it once to the 16-bit type is what torch's ``diff.to(dtype) * scale`` does."""
    rows, cols = codes.shape
    width = cols // scale.shape[1]
    diff = codes.astype(np.int32) - np.repeat(zero.astype(np.int32), width, axis=1)
    s = np.repeat(scale, width, axis=1)
    if dtype == "BF16":
        return _f32_to_bf16(diff.astype(np.float32) * _bf16_to_f32(s))
    if dtype == "F16":
        return (diff.astype(np.float32) * s.astype(np.float32)).astype(np.float16)
    np_t = FLOAT_DTYPES[dtype]
    return diff.astype(np_t) * s.astype(np_t)


def check_codes(codes: np.ndarray, zero: np.ndarray, bits: int, what: str = "") -> None:
    qmax = (1 << bits) - 1
    for name, a in (("code", codes), ("zero point", zero)):
        if a.size and int(a.max()) > qmax:
            raise LayoutError(f"{what}: {name} {int(a.max())} outside 0..{qmax} ({bits} bits)")


# ---------------------------------------------------------------------------------------------
# compressed-tensors "pack-quantized"
def encode_pack_quantized(
    codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int
) -> dict[str, np.ndarray]:
    """Parts of one module: ``weight_packed`` int32 ``[R, ceil(C*N/32)]`` (row-wise N-bit
    stream of the unsigned codes, word-aligned per row), ``weight_scale`` as given,
    ``weight_zero_point`` int32 ``[ceil(R*N/32), G]`` (column-wise stream of the unsigned zero
    points along dim 0), ``weight_shape`` int64 ``[R, C]``."""
    check_codes(codes, zero, bits, "pack-quantized")
    rows, cols = codes.shape
    packed = pack_stream(codes, bits, 32).view("<i4").reshape(rows, -1)
    zp = pack_stream(np.ascontiguousarray(zero.T), bits, 32).view("<i4")
    zp = zp.reshape(zero.shape[1], -1).T
    return {
        "weight_packed": np.ascontiguousarray(packed),
        "weight_scale": np.ascontiguousarray(scale),
        "weight_zero_point": np.ascontiguousarray(zp),
        "weight_shape": np.array([rows, cols], dtype=np.int64),
    }


def decode_pack_quantized(
    parts: dict[str, np.ndarray], bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scale, zero)`` of a pack-quantized module, with the layout's shape checks."""
    rows, cols = (int(x) for x in parts["weight_shape"])
    packed = np.ascontiguousarray(parts["weight_packed"])
    scale = parts["weight_scale"]
    zp = np.ascontiguousarray(parts["weight_zero_point"])
    words = -(-cols * bits // 32)
    if packed.dtype != np.int32 or packed.shape != (rows, words):
        raise LayoutError(
            f"weight_packed {packed.shape} {packed.dtype}, expected ({rows}, {words})"
        )
    if scale.ndim != 2 or scale.shape[0] != rows or scale.shape[1] < 1 or cols % scale.shape[1]:
        raise LayoutError(f"weight_scale {scale.shape} does not fit [{rows}, {cols}]")
    groups = scale.shape[1]
    if zp.dtype != np.int32 or zp.shape != (-(-rows * bits // 32), groups):
        raise LayoutError(f"weight_zero_point {zp.shape} does not fit {rows} rows, {groups} groups")
    codes = unpack_stream(packed.view(np.uint8).reshape(rows, words * 4), bits, cols)
    zero = unpack_stream(np.ascontiguousarray(zp.T).view(np.uint8), bits, rows).T
    return codes, scale, np.ascontiguousarray(zero)


# ---------------------------------------------------------------------------------------------
# besa-rs "bitmask-quantized"
def encode_bitmask_quantized(
    codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int
) -> dict[str, np.ndarray]:
    """Parts of one module: ``shape`` int64 ``[R, C]``; ``bitmask`` uint8 ``[R, ceil(C/8)]``
    (bit set = stored = code differs from its group's zero point; LSB first, rows padded);
    ``codes`` uint8 ``[ceil(nnz*N/8)]`` (the stored codes in row-major order, one N-bit stream);
    ``weight_scale`` as given; ``weight_zero_point`` uint8 ``[ceil(R*G*N/8)]`` (row-major
    N-bit stream)."""
    check_codes(codes, zero, bits, "bitmask-quantized")
    rows, cols = codes.shape
    width = cols // scale.shape[1]
    keep = codes != np.repeat(zero, width, axis=1)
    return {
        "shape": np.array([rows, cols], dtype=np.int64),
        "bitmask": np.packbits(keep, axis=1, bitorder="little"),
        "codes": pack_stream(codes[keep], bits),
        "weight_scale": np.ascontiguousarray(scale),
        "weight_zero_point": pack_stream(zero.reshape(-1), bits),
    }


def decode_bitmask_quantized(
    parts: dict[str, np.ndarray], bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, scale, zero)`` of a bitmask-quantized module (pruned positions get their
    group's zero point), with the layout's structural checks."""
    rows, cols = (int(x) for x in parts["shape"])
    bm = parts["bitmask"]
    scale = parts["weight_scale"]
    if bm.shape != (rows, -(-cols // 8)):
        raise LayoutError(f"bitmask {bm.shape}, expected ({rows}, {-(-cols // 8)})")
    keep_full = np.unpackbits(bm, axis=1, bitorder="little")
    if keep_full[:, cols:].any():
        raise LayoutError("bitmask padding bits set")
    keep = keep_full[:, :cols].astype(bool)
    if scale.ndim != 2 or scale.shape[0] != rows or scale.shape[1] < 1 or cols % scale.shape[1]:
        raise LayoutError(f"weight_scale {scale.shape} does not fit [{rows}, {cols}]")
    groups = scale.shape[1]
    zp = parts["weight_zero_point"]
    if zp.shape != (-(-rows * groups * bits // 8),):
        raise LayoutError(f"weight_zero_point {zp.shape} does not fit {rows}x{groups} groups")
    zero = unpack_stream(zp, bits, rows * groups).reshape(rows, groups)
    nnz = int(keep.sum())
    cb = parts["codes"]
    if cb.shape != (-(-nnz * bits // 8),):
        raise LayoutError(f"codes {cb.shape} does not hold {nnz} {bits}-bit codes")
    stored = unpack_stream(cb, bits, nnz)
    full_zero = np.repeat(zero, cols // groups, axis=1)
    codes = full_zero.copy()
    codes[keep] = stored
    if (stored == full_zero[keep]).any():
        raise LayoutError("a stored code equals its zero point (its bitmask bit must be clear)")
    return codes, scale, zero


def bitmask_quantized_ideal_bytes(
    rows: int, cols: int, nnz: int, groups: int, bits: int, scale_itemsize: int
) -> float:
    """The ideal of the issue: mask bits + N bits per kept weight + group parameters (scale
    in the model dtype + N-bit zero point per group), in bytes, header not included."""
    return (rows * cols + nnz * bits + rows * groups * (8 * scale_itemsize + bits)) / 8


# ---------------------------------------------------------------------------------------------
def crc32(parts: dict[str, np.ndarray], order: tuple[str, ...]) -> str:
    """``besa_rs.crc32.<module>``: CRC-32 over the raw little-endian bytes of the parts in
    ``order``, as 8 lowercase hex digits."""
    c = 0
    for name in order:
        c = zlib.crc32(np.ascontiguousarray(parts[name]).tobytes(), c)
    return f"{c:08x}"


def random_module(
    rows: int,
    cols: int,
    bits: int,
    group: int,
    density: float = 0.5,
    dtype: str = "BF16",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random ``(codes, scale, zero)`` of a pruned + quantized weight: the pruned positions
    (``1 - density``) hold the zero point, kept ones any code (some equal to it, as rounding
    does). ``group = -1``: one group per row."""
    rng = np.random.default_rng(seed)
    width = cols if group == -1 else group
    groups = cols // width
    zero = rng.integers(0, 1 << bits, size=(rows, groups), dtype=np.uint8)
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    pruned = rng.random((rows, cols)) >= density
    codes[pruned] = np.repeat(zero, width, axis=1)[pruned]
    s = (rng.random((rows, groups), dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
    scale = _f32_to_bf16(s) if dtype == "BF16" else s.astype(FLOAT_DTYPES[dtype])
    return codes, scale, zero


# ---------------------------------------------------------------------------------------------
# whole checkpoints (numpy only: safetensors read and written by hand, BF16 as uint16 bits)
_NP_OF = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}  # fmt: skip
_NAME_OF = {np.dtype(v): k for k, v in _NP_OF.items() if k != "BF16"}

Tensors = dict[str, tuple[str, np.ndarray]]


def read_safetensors(path: Any) -> tuple[Tensors, dict[str, str]]:
    """``({name: (dtype name, array)}, metadata)`` of a safetensors file (arrays are views of
    one buffer read from disk)."""
    import json

    data = np.fromfile(path, dtype=np.uint8)
    n = int(data[:8].view("<u8")[0])
    header = json.loads(data[8 : 8 + n].tobytes())
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    out: Tensors = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        arr = data[base + b : base + e].view(_NP_OF[h["dtype"]]).reshape(h["shape"])
        out[name] = (h["dtype"], arr)
    return out, meta


def write_safetensors(path: Any, tensors: Tensors, metadata: dict[str, str]) -> None:
    """Writes ``tensors`` in order of decreasing item size (every tensor aligned)."""
    import json

    order = sorted(tensors, key=lambda k: -tensors[k][1].dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    off = 0
    for k in order:
        dt, a = tensors[k]
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for k in order:
            f.write(np.ascontiguousarray(tensors[k][1]).tobytes())


def pack_quantized_config(bits: int, group_size: int) -> dict[str, Any]:
    """config.json's ``quantization_config`` of a pack-quantized checkpoint (what
    compressed-tensors 0.20.1's ``ModelCompressor.update_config`` writes for this scheme)."""
    return {
        "config_groups": {
            "group_0": {
                "format": None,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "dynamic": False,
                    "group_size": None if group_size == -1 else group_size,
                    "num_bits": bits,
                    "strategy": "channel" if group_size == -1 else "group",
                    "symmetric": False,
                    "type": "int",
                },
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.1",
    }


def bitmask_quantized_config(
    bits: int, group_size: int, global_sparsity: float, targets: list[str]
) -> dict[str, Any]:
    """config.json's ``quantization_config`` of a bitmask-quantized checkpoint."""
    qc = pack_quantized_config(bits, group_size)
    qc.update(
        quant_method="besa-rs",
        format="bitmask-quantized",
        version="1",
        sparsity_config={
            "format": "bitmask-quantized",
            "global_sparsity": global_sparsity,
            "sparsity_structure": "unstructured",
            "targets": targets,
            "ignore": ["lm_head"],
        },
    )
    return qc


def pack_dir(src: Any, out: Any, fmt: str) -> dict[str, Any]:
    """Reference ``besa-rs pack --format pack-quantized|bitmask-quantized`` of a single-file
    model directory with ``quantization.safetensors``: the quantized modules packed (codes,
    scales and zero points from the side file), every other tensor copied, CRC metadata,
    config.json with the ``quantization_config`` block. Returns the modules' parts."""
    import json
    import shutil
    from pathlib import Path

    src, out = Path(src), Path(out)
    out.mkdir(parents=True)
    model, _ = read_safetensors(src / "model.safetensors")
    side, smeta = read_safetensors(src / "quantization.safetensors")
    layers = json.loads(smeta["layers"])
    (bits,) = {int(v["bits"]) for v in layers.values()}
    (gs,) = {int(v["group_size"]) for v in layers.values()}
    tensors: Tensors = {k: v for k, v in model.items() if k not in layers}
    meta = {"besa_rs.format": fmt}
    mods: dict[str, dict[str, np.ndarray]] = {}
    zeros = total = 0
    for wname in layers:
        m = wname[: -len(".weight")]
        dt = model[wname][0]
        codes = side[f"{m}.weight_codes"][1]
        scale = side[f"{m}.weight_scale"][1]
        zero = side[f"{m}.weight_zero_point"][1]
        if not np.array_equal(dequantize(codes, scale, zero, dt), model[wname][1]):
            raise LayoutError(f"{wname}: weights are not the dequantized side-file values")
        if fmt == "pack-quantized":
            parts, order = encode_pack_quantized(codes, scale, zero, bits), PACK_QUANTIZED_PARTS
        else:
            parts, order = (
                encode_bitmask_quantized(codes, scale, zero, bits),
                BITMASK_QUANTIZED_PARTS,
            )
        width = codes.shape[1] // scale.shape[1]
        zeros += int((codes == np.repeat(zero, width, axis=1)).sum())
        total += codes.size
        mods[m] = parts
        meta[f"besa_rs.crc32.{m}"] = crc32(parts, order)
        for p, a in parts.items():
            pdt = dt if p == "weight_scale" else _NAME_OF[a.dtype]
            tensors[f"{m}.{p}"] = (pdt, a)
    write_safetensors(out / "model.safetensors", tensors, meta)
    cfg = json.loads((src / "config.json").read_text())
    if fmt == "pack-quantized":
        cfg["quantization_config"] = pack_quantized_config(bits, gs)
    else:
        cfg["quantization_config"] = bitmask_quantized_config(
            bits, gs, zeros / max(total, 1), sorted(mods)
        )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "special_tokens")):
            shutil.copy(f, out / f.name)
    return mods


def unpack_dir(src: Any, out: Any) -> None:
    """Reference ``besa-rs unpack`` of a single-file quantized packed directory: dense
    dequantized weights in ``model.safetensors``, the regenerated ``quantization.safetensors``
    (tensors and metadata keys of besa-rs' side file), config.json without
    ``quantization_config``."""
    import json
    import shutil
    from pathlib import Path

    src, out = Path(src), Path(out)
    out.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (group,) = qc["config_groups"].values()
    bits = int(group["weights"]["num_bits"])
    gs = -1 if group["weights"]["strategy"] == "channel" else int(group["weights"]["group_size"])
    fmt = qc["format"]
    anchor, parts_of, decode = (
        ("weight_packed", PACK_QUANTIZED_PARTS, decode_pack_quantized)
        if fmt == "pack-quantized"
        else ("bitmask", BITMASK_QUANTIZED_PARTS, decode_bitmask_quantized)
    )
    tensors, meta = read_safetensors(src / "model.safetensors")
    mods = [k[: -len(anchor) - 1] for k in tensors if k.endswith("." + anchor)]
    dense: Tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in mods}
    side: Tensors = {}
    layers = {}
    for m in mods:
        parts = {p: tensors[f"{m}.{p}"][1] for p in parts_of}
        if meta.get(f"besa_rs.crc32.{m}") not in (None, crc32(parts, parts_of)):
            raise LayoutError(f"{m}: checksum mismatch")
        codes, scale, zero = decode(parts, bits)
        dt = tensors[f"{m}.weight_scale"][0]
        dense[f"{m}.weight"] = (dt, dequantize(codes, scale, zero, dt))
        side[f"{m}.weight_codes"] = ("U8", codes)
        side[f"{m}.weight_scale"] = (dt, np.ascontiguousarray(scale))
        side[f"{m}.weight_zero_point"] = ("U8", zero)
        layers[f"{m}.weight"] = {"bits": bits, "group_size": gs, "shape": list(codes.shape)}
    write_safetensors(out / "model.safetensors", dense, {})
    smeta = {
        "format": "besa-rs-quant",
        "version": "1",
        "bits": json.dumps(bits),
        "group_size": json.dumps(gs),
        "symmetric": "false",
        "layers": json.dumps(layers),
    }
    write_safetensors(out / "quantization.safetensors", side, smeta)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "special_tokens")):
            shutil.copy(f, out / f.name)

"""``besa_rs.inspect``: what is in a checkpoint (computed in Rust over a memory map)."""

from __future__ import annotations

import os
from typing import Any

from . import _native
from ._table import format_table, human_bytes


def inspect(path: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Reads a safetensors file or model directory (sharded or not) and returns, per tensor,
    name/dtype/shape/size/zero fraction, a per-layer-type summary and totals. With ``verify``
    (default) every packed tensor's CRC-32 and structure are checked first (``IntegrityError`` /
    ``FormatError``); the report's ``verified`` says how many."""
    return _native.inspect(os.fspath(path), verify=verify)


def format_report(report: dict[str, Any], per_tensor: bool = True) -> str:
    parts = [f"{report['path']}  ({len(report['files'])} file(s), {report['format']})"]
    if per_tensor:
        rows = [
            [
                t["name"],
                t["dtype"],
                "x".join(map(str, t["shape"])) or "scalar",
                human_bytes(t["nbytes"]),
                "-" if t["sparsity"] is None else f"{100 * t['sparsity']:.2f}%",
            ]
            for t in report["tensors"]
        ]
        parts.append(format_table(["tensor", "dtype", "shape", "size", "zeros"], rows))
    rows = [
        [
            g["kind"],
            g["tensors"],
            f"{g['numel']:,}",
            human_bytes(g["nbytes"]),
            f"{100 * g['sparsity']:.2f}%",
        ]
        for g in report["groups"]
    ]
    parts.append(format_table(["layer type", "tensors", "params", "size", "zeros"], rows))
    if report.get("packed"):
        # quantized formats also show their bit width and group size (-1: whole rows)
        quantized = any("bits" in p for p in report["packed"])
        rows = [
            [
                p["name"],
                p["format"],
                *([str(p.get("bits", "")), str(p.get("group_size", ""))] if quantized else []),
                p["dtype"],
                "x".join(map(str, p["shape"])),
                f"{p['nnz']:,}",
                f"{100 * p['sparsity']:.2f}%",
                human_bytes(p["dense_bytes"]),
                human_bytes(p["packed_bytes"]),
            ]
            for p in report["packed"]
        ]
        head = ["packed tensor", "format", *(["bits", "group"] if quantized else [])]
        parts.append(
            format_table(
                [*head, "dtype", "dense shape", "nnz", "zeros", "dense", "packed"],
                rows,
            )
        )
    if report.get("packed") is not None:
        v = report.get("verified")
        parts.append(
            f"verified: {v['packed_tensors']} packed tensors ({v['checksums']} CRC-32 checksums) OK"
            if v
            else "packed tensors NOT verified (--no-verify)"
        )
    t = report["totals"]
    parts.append(
        f"total: {t['tensors']} tensors, {t['numel']:,} params, {human_bytes(t['nbytes'])} of tensors "
        f"({human_bytes(t['file_bytes'])} on disk), zeros {100 * t['sparsity']:.2f}% overall, "
        f"{100 * t['block_linear_sparsity']:.2f}% in block linear weights"
    )
    return "\n\n".join(parts)

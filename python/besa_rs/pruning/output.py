"""Outputs of a pruning run: the Hugging Face model directory (``save_pretrained``,
safetensors, exact zeros), the tokenizer, ``besa_report.json`` and a PNG heatmap of the
per-layer sparsity (blocks x projection types)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._io import atomic_dir, atomic_path, write_json_atomic
from . import quant

REPORT = "besa_report.json"
HEATMAP = "sparsity_heatmap.png"


def heatmap(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Blocks (rows) x projection types (columns) coloured by realised sparsity; with BESA the
    learned allocation after the exact-sparsity shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = report["blocks"]
    names: list[str] = []
    for b in blocks:
        for li in b["layers"]:
            if li["name"] not in names:
                names.append(li["name"])
    grid = np.full((len(blocks), len(names)), np.nan)
    for r, b in enumerate(blocks):
        for li in b["layers"]:
            grid[r, names.index(li["name"])] = 100.0 * li["realised_sparsity"]
    short = [n.split(".")[-1] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.5 + 0.28 * len(blocks)), dpi=110)
    target = 100.0 * report["settings"]["sparsity"]
    span = max(1.0, float(np.nanmax(np.abs(grid - target)))) if grid.size else 1.0
    im = ax.imshow(grid, cmap="coolwarm", vmin=target - span, vmax=target + span, aspect="auto")
    ax.set_xticks(range(len(names)), short, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b["index"]) for b in blocks])
    ax.set_ylabel("block")
    s = report["settings"]
    ax.set_title(f"{s['method']} sparsity per layer (%), target {target:.0f}%", fontsize=10)
    if len(blocks) * len(names) <= 400:
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                if not np.isnan(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="sparsity %")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_outputs(
    model: Any,
    tokenizer: Any,
    report: dict[str, Any],
    out: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """Writes the model directory atomically: built under a temporary name next to ``out`` and
    renamed into place only when complete."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report = dict(report, outputs={"model_dir": str(out), "report": REPORT, "heatmap": HEATMAP})
        qfile = quant.write_quant_file(model, tmp)  # quantization.safetensors, if quantized
        if qfile is not None:
            report["quantization"] = qfile
            report["outputs"]["quantization"] = qfile["file"]
        write_json_atomic(tmp / REPORT, report)
        heatmap(report, tmp / HEATMAP)
    return out

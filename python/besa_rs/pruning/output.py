"""Outputs of a pruning run: the Hugging Face model directory (``save_pretrained``,
safetensors, exact zeros), the tokenizer, ``besa_report.json`` and a PNG heatmap of the
per-layer sparsity (blocks x projection types)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from .._io import atomic_dir, atomic_path, check_output_dir, check_output_file, write_json_atomic
from ..errors import ConfigError
from . import quant

REPORT = "besa_report.json"
HEATMAP = "sparsity_heatmap.png"
#: Files a checkpoint directory holds (``checkpoint.py``; a streamed run's output files being
#: filled, ``streaming.py``), and atomic_path's temporaries.
_CHECKPOINT_FILE = re.compile(
    r"(block_\d+\.safetensors|inputs_\d+(\.rank\d+)?\.pt|state\.json|\..*\.tmp"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|quantization\.safetensors)"
)


def _is_checkpoint_dir(d: Path) -> bool:
    return d.is_dir() and all(
        p.is_file() and _CHECKPOINT_FILE.fullmatch(p.name) for p in d.iterdir()
    )


def check_prune_paths(
    model: str | os.PathLike[str],
    out: Path,
    ckdir: Path,
    *,
    overwrite: bool,
    resume: bool,
    json_path: str | None,
) -> list[str]:
    """Everything about a prune's paths that can be checked before any work, in one place:

    - the model's safetensors files pass besa-rs's validating reader (one-line FormatError);
    - ``--out`` and its checkpoint directory do not overlap the model (symlinks resolved);
    - an existing ``--out`` is replaced (``--overwrite``) only when it is a previous prune's
      output (it holds ``besa_report.json``) or empty: nothing else is ever deleted;
    - a checkpoint directory without ``state.json`` (a run killed inside its first checkpoint
      write) is removed and the run starts over, with or without ``--resume``; a complete one
      needs ``--resume`` or ``--overwrite``; a directory there that is not a checkpoint is refused;
    - ``--out`` and ``--json`` are writable, with room for about the model's size.

    Returns notes for the user (what was cleaned up)."""
    from .. import _native
    from ..models import BUILTIN_MODELS, check_model_files, resolve_model
    from .checkpoint import STATE

    notes: list[str] = []
    check_output_file(json_path, "--json")
    need = 0
    if os.fspath(model) not in BUILTIN_MODELS:
        mpath = resolve_model(model)
        _native.check_out(mpath, out)
        _native.check_out(mpath, ckdir)
        check_model_files(mpath)
        files = [mpath] if mpath.is_file() else list(mpath.glob("*.safetensors"))
        need = sum(f.stat().st_size for f in files)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConfigError(
                f"output directory {out} already exists (pass --overwrite to replace it)"
            )
        if not out.is_dir() or out.is_symlink():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        if not (out / REPORT).is_file() and any(out.iterdir()):
            raise ConfigError(
                f"refusing to replace {out}: it is not a besa-rs prune output (no {REPORT}); "
                "move it away or choose another --out"
            )
    if ckdir.exists() or ckdir.is_symlink():
        if not _is_checkpoint_dir(ckdir) or ckdir.is_symlink():
            raise ConfigError(
                f"{ckdir} exists but is not a besa-rs checkpoint: move it away or choose another --out"
            )
        if not (ckdir / STATE).is_file():
            shutil.rmtree(ckdir)
            notes.append(
                f"removed {ckdir}: an incomplete first checkpoint of a killed run; starting over"
            )
        elif not resume:
            if not overwrite:
                raise ConfigError(
                    f"an unfinished run's checkpoint exists at {ckdir}: pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(ckdir)
    elif resume:
        raise ConfigError(f"--resume: no checkpoint to resume at {ckdir}")
    check_output_dir(out, "--out", need_bytes=need)
    return notes


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
    stream: Any = None,
) -> Path:
    """Writes the model directory atomically: built under a temporary name next to ``out`` and
    renamed into place only when complete. With ``stream`` (a streamed run's
    :class:`besa_rs.pruning.streaming.StreamedModel`) the weight files it filled are moved in."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if stream is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            streamed_q = stream.save_into(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report = dict(report, outputs={"model_dir": str(out), "report": REPORT, "heatmap": HEATMAP})
        # quantization.safetensors, if quantized
        qfile = quant.write_quant_file(model, tmp) if stream is None else streamed_q
        if qfile is not None:
            report["quantization"] = qfile
            report["outputs"]["quantization"] = qfile["file"]
        write_json_atomic(tmp / REPORT, report)
        heatmap(report, tmp / HEATMAP)
    return out

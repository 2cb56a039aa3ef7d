"""``besa_rs.simulate`` (module ``besa_rs.simulation``): speed-up of a sparse model on the ViTCoD accelerator (cycle model in Rust).

Two modes (see docs/simulator.md):

- ``"reference"``: the BESA authors' model, bit-for-bit (the numbers of the paper's Table 5);
- ``"full"``: the reference numbers plus a corrected model with DRAM traffic, storage-format
  metadata and decode / prefill workloads.

Weights are never loaded into torch when a path is given: Rust maps the safetensors files and
reads each matrix's zero pattern in place, several matrices at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _native, dtypes
from .errors import ConfigError, DtypeError
from .sim_report import MatrixReport, Mode, SimReport

#: Parameters of the full model (``--mode full``), in CLI help order.
FULL_KEYS: tuple[str, ...] = _native.SIM_FULL_OPTIONS
#: Storage formats of the full model (``format=``): the packed formats whose index it models
#: (listed by Rust, ``besa_sim::full::formats``).
FORMATS: tuple[str, ...] = _native.SIM_FORMATS


def _as_array(x: Any, name: str) -> tuple[Any, str]:
    """``x`` as a numpy array (no copy for CPU data; bfloat16 as its bits in a uint16 view) and
    its safetensors dtype name; shape and dtype are checked by the engine."""
    if type(x).__module__.startswith("torch"):
        import torch

        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            dt = dtypes.name_of(t.dtype) or str(t.dtype).removeprefix("torch.")
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(np.uint16), dt
            try:
                return t.numpy(), dt
            except TypeError:  # a dtype numpy does not have (float8, ...)
                raise DtypeError(f"{name}: dtype {t.dtype} is not supported") from None
    a = np.asarray(x)
    return a, dtypes.name_of(a.dtype) or str(a.dtype)


def simulate_matrix(
    mask_or_weight: Any,
    mode: Mode = "reference",
    *,
    name: str = "matrix",
    kind: str | None = None,
    **options: Any,
) -> MatrixReport:
    """Simulates one 2-D weight or keep-mask (numpy or torch; bool, float16, bfloat16, float32,
    float64; numpy buffers are read in place). ``kind`` is the projection type (the default is
    guessed from ``name``; ``"down"`` matrices wider than tall are split into column chunks).
    ``options``: see :class:`besa_rs._native.SimParams`. Returns the matrix report: ``cycles``,
    ``dense_cycles``, ``speedup``, ``flops``, ``sparsity``, ``dense_columns``,
    ``threshold_ratios``, per-chunk details and, in full mode, ``full`` (decode / prefill); see
    :class:`besa_rs.sim_report.MatrixReport`."""
    params = _native.SimParams(mode, **options)
    arr, dt = _as_array(mask_or_weight, name)
    return _native.simulate_matrix(arr, dt, params, name=name, kind=kind)


def simulate(
    model: Any,
    mode: Mode = "reference",
    *,
    layers: str | None = None,
    progress: bool = False,
    batch: int | None = None,
    on_matrix: Callable[[MatrixReport], object] | None = None,
    **options: Any,
) -> SimReport:
    """Simulates every decoder-block linear weight of a model, in one call into Rust.

    ``model``: a Hugging Face model directory or safetensors file (read by Rust through mmap),
    a ``torch.nn.Module``, or a state dict (name -> tensor/array). ``layers``: a regular
    expression; only 2-D tensors whose name matches are simulated (default: the 2-D
    ``*weight`` tensors of numbered blocks, or every 2-D tensor of a file without blocks).
    ``batch``: in-memory tensors converted at a time (default: twice the worker threads).
    ``options``: see :class:`besa_rs._native.SimParams` (``pe_width``, ``pe_height``,
    ``start_ratio``, ``float_mode``, full-mode hardware in MHz, GB/s and KB). Returns
    ``{"mode", "path", "params", "matrices", "summary", "totals", "skipped"}`` (see
    :class:`besa_rs.sim_report.SimReport`)."""
    params = _native.SimParams(mode, **options)
    pattern = None
    if layers is not None:
        try:
            pattern = re.compile(layers)
        except re.error as e:
            raise ConfigError(f"--layers: invalid regular expression {layers!r}: {e}") from None
    bar: Any = None

    def done(m: MatrixReport, total: int) -> None:
        nonlocal bar
        if on_matrix is not None:
            on_matrix(m)
        if progress:
            if bar is None:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, desc="simulate", unit="matrix")
            bar.update(1)

    callback = done if (progress or on_matrix is not None) else None
    try:
        if isinstance(model, (str, os.PathLike)):
            return _native.simulate_path(
                os.fspath(model), params, layers=pattern, on_matrix=callback
            )
        tensors = _state_dict(model)
        metas = [
            (k, list(getattr(v, "shape", ())), str(getattr(v, "dtype", "?")))
            for k, v in tensors.items()
        ]
        return _native.simulate_arrays(
            type(model).__name__,
            metas,
            lambda n: _as_array(tensors[n], n),
            params,
            layers=pattern,
            on_matrix=callback,
            batch=batch,
        )
    finally:
        if bar is not None:
            bar.close()


def _state_dict(model: Any) -> Mapping[str, Any]:
    if isinstance(model, Mapping):
        return model
    sd = getattr(model, "state_dict", None)
    if callable(sd):
        return sd()
    raise ConfigError(
        f"simulate() takes a model path, a torch.nn.Module or a state dict, not {type(model).__name__}"
    )


def dense_baseline(
    rows: int, cols: int, kind: str = "", *, pe_width: int = 64, pe_height: int = 64
) -> int:
    """Dense-baseline cycles of the reference model for a ``rows x cols`` weight of projection
    type ``kind``: ``ceil(C^2 / (W*H))`` per matrix, summed over ``rows``-wide column chunks for
    ``down`` (e.g. LLaMA-7B: 4096 for q/k/v/o/gate/up, 10128 for down)."""
    return int(_native.dense_baseline_cycles(rows, cols, kind == "down", pe_width, pe_height))


def format_report(report: Mapping[str, Any], per_matrix: bool | None = None) -> str:
    """The summary table (and the per-matrix table when asked, or for small models)."""
    from ._table import format_table

    full = report["mode"] == "full"
    parts = [f"{report['path']}  ({report['mode']} mode, {len(report['matrices'])} matrices)"]
    ms = report["matrices"]
    if per_matrix or (per_matrix is None and len(ms) <= 16):
        rows = []
        for m in ms:
            row = [
                m["name"],
                "x".join(map(str, m["shape"])),
                f"{100 * m['sparsity']:.2f}%",
                m["cycles"],
                m["dense_cycles"],
                f"{m['speedup']:.3f}x",
                m["dense_columns"],
                ",".join(f"{r:.4g}" for r in m["threshold_ratios"]),
            ]
            if full:
                f = m["full"]
                row += [
                    f"{f['decode']['speedup']:.3f}x",
                    f"{f['prefill']['speedup']:.3f}x",
                    f"{f['bandwidth_bound']:.3f}x",
                ]
            rows.append(row)
        head = ["matrix", "shape", "sparsity", "cycles", "dense", "speed-up", "G", "ratio"]
        if full:
            head += ["decode", "prefill", "bw bound"]
        parts.append(format_table(head, rows))
    rows = []
    for kind, s in report["summary"].items():
        row = [
            kind,
            s["matrices"],
            f"{100 * s['sparsity']:.2f}%",
            f"{s['avg_cycles']:.1f}",
            f"{s['dense_cycles']:.1f}",
            f"{s['speedup']:.3f}x",
            f"{s['avg_flops']:.4g}",
            f"{s['avg_dense_columns']:.1f}",
        ]
        if full:
            row += [
                f"{s['decode_speedup']:.3f}x",
                f"{s['prefill_speedup']:.3f}x",
                f"{s['bandwidth_bound']:.3f}x",
            ]
        rows.append(row)
    head = [
        "type",
        "matrices",
        "sparsity",
        "avg cycles",
        "dense cycles",
        "speed-up",
        "avg FLOPs",
        "avg G",
    ]
    if full:
        head += ["decode", "prefill", "bw bound"]
    parts.append(format_table(head, rows))
    t = report["totals"]
    line = (
        f"total: {t['matrices']} matrices, {t['cycles']:,} cycles vs {t['dense_cycles']:,} dense "
        f"({t['speedup']:.3f}x), sparsity {100 * t['sparsity']:.2f}%"
    )
    if full:
        line += (
            f"; full model: decode {t['decode_speedup']:.3f}x, prefill {t['prefill_speedup']:.3f}x, "
            f"bandwidth bound {t['bandwidth_bound']:.3f}x"
        )
    parts.append(line)
    if report.get("skipped"):
        parts.append(
            f"skipped {len(report['skipped'])} tensor(s) (not 2-D or not a block weight; see JSON)"
        )
    return "\n\n".join(parts)


def plot_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """PNG of per-layer speed-ups per projection type (reference; decode too in full mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ._io import atomic_path

    full = report["mode"] == "full"
    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for i, m in enumerate(report["matrices"]):
        layer = m["layer"] if m["layer"] is not None else i
        dec = m["full"]["decode"]["speedup"] if full else None
        series.setdefault(m["kind"], []).append((layer, m["speedup"], dec))
    ncols = 2 if full else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.2), squeeze=False)
    for kind in report["summary"]:  # display order
        pts = sorted(series[kind])
        xs = [p[0] for p in pts]
        axes[0][0].plot(xs, [p[1] for p in pts], marker="o", ms=3, label=kind)
        if full:
            axes[0][1].plot(xs, [p[2] for p in pts], marker="o", ms=3, label=kind)
    titles = ["reference (ViTCoD, paper model)", "full model, decode (1 token)"]
    for k in range(ncols):
        ax = axes[0][k]
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("speed-up vs dense")
        ax.set_title(titles[k])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle(str(report["path"]), fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

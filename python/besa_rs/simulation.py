"""``besa_rs.simulate`` (module ``besa_rs.simulation``): speed-up of a sparse model on the ViTCoD accelerator (cycle model in Rust).

Two modes (see docs/simulator.md):

- ``"reference"``: the BESA authors' model, bit-for-bit (the numbers of the paper's Table 5);
- ``"full"``: the reference numbers plus a corrected model with DRAM traffic, storage-format
  metadata and decode / prefill workloads.

Weights are never loaded into torch when a path is given: Rust maps the safetensors files and
reads each matrix's zero pattern in place, several matrices at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _native
from .errors import ConfigError, DtypeError, ShapeError

#: Display order of projection types (others follow alphabetically).
TYPE_ORDER: tuple[str, ...] = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down")

#: Parameters of the full model (``--mode full``), in CLI help order.
FULL_KEYS: tuple[str, ...] = (
    "clock_mhz",
    "bandwidth_gbs",
    "value_bits",
    "act_bits",
    "index_bits",
    "format",
    "prefill_tokens",
    "weight_buffer_kb",
    "index_buffer_kb",
    "input_buffer_kb",
    "output_buffer_kb",
)


def sim_params(
    mode: str = "reference",
    *,
    pe_width: int = 64,
    pe_height: int = 64,
    start_ratio: float = 0.5,
    float_mode: str = "f32",
    chunk_kinds: Sequence[str] = ("down",),
    **full: Any,
) -> dict[str, Any]:
    """The parameter dict the Rust engine takes. ``full`` keys (full mode only):
    ``clock_mhz`` (500), ``bandwidth_gbs`` (76.8), ``value_bits`` (16), ``act_bits`` (16),
    ``index_bits`` (32), ``format`` ("bitmask" | "csr" | "2:4"), ``prefill_tokens`` (2048),
    ``weight_buffer_kb`` (106), ``index_buffer_kb`` (20), ``input_buffer_kb`` (53),
    ``output_buffer_kb`` (108)."""
    if mode not in ("reference", "full"):
        raise ConfigError(f"mode must be 'reference' or 'full', not {mode!r}")
    if float_mode not in ("f32", "f64"):
        raise ConfigError(
            f"float_mode must be 'f32' (the authors' torch code) or 'f64', not {float_mode!r}"
        )
    unknown = set(full) - set(FULL_KEYS)
    if unknown:
        raise ConfigError(f"unknown simulator option(s): {', '.join(sorted(unknown))}")
    if mode == "reference" and any(v is not None for v in full.values()):
        raise ConfigError(f"option(s) {', '.join(sorted(full))} only apply to mode='full'")
    for name, v in (("pe_width", pe_width), ("pe_height", pe_height)):
        if int(v) < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    params: dict[str, Any] = {
        "reference": {
            "pe_width": int(pe_width),
            "pe_height": int(pe_height),
            "start_ratio": float(start_ratio),
            "float": float_mode,
        },
        "full": None,
        "chunk_kinds": list(chunk_kinds),
    }
    if mode == "full":
        f = json.loads(_native.default_params_json())["full"]
        f["pe_width"], f["pe_height"] = int(pe_width), int(pe_height)
        conv = {
            "clock_mhz": ("clock_hz", lambda v: float(v) * 1e6),
            "bandwidth_gbs": ("bandwidth", lambda v: float(v) * 1e9),
            "weight_buffer_kb": ("weight_buffer", lambda v: int(float(v) * 1024)),
            "index_buffer_kb": ("index_buffer", lambda v: int(float(v) * 1024)),
            "input_buffer_kb": ("input_buffer", lambda v: int(float(v) * 1024)),
            "output_buffer_kb": ("output_buffer", lambda v: int(float(v) * 1024)),
        }
        for k, v in full.items():
            if v is None:
                continue
            if k in conv:
                key, fn = conv[k]
                f[key] = fn(v)
            elif k == "format":
                if v not in ("bitmask", "csr", "2:4"):
                    raise ConfigError(f"format must be bitmask, csr or 2:4, not {v!r}")
                f[k] = v
            else:
                if int(v) < 1:
                    raise ConfigError(f"{k} must be >= 1, got {v}")
                f[k] = int(v)
        params["full"] = f
    return params


def _as_array(x: Any, name: str) -> tuple[np.ndarray, str, str]:
    """A C-contiguous 2-D unsigned view of ``x``'s bytes (no copy for CPU data), the element
    name the engine understands, and the dtype name for the report."""
    if type(x).__module__.startswith("torch"):
        import torch
    if type(x).__module__.startswith("torch") and isinstance(x, torch.Tensor):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dim() != 2:
            raise ShapeError(f"{name}: expected a 2-D weight or mask, got shape {tuple(t.shape)}")
        t = t.contiguous()
        dt = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), "bf16", dt
        if t.dtype in (torch.bool, torch.float16, torch.float32, torch.float64):
            arr, elem, _ = _as_array(t.numpy(), name)
            return arr, elem, dt
        raise DtypeError(
            f"{name}: dtype {dt} is not supported (expected bool, float16, bfloat16, float32 or float64)"
        )
    a = np.asarray(x)
    if a.ndim != 2:
        raise ShapeError(f"{name}: expected a 2-D weight or mask, got shape {a.shape}")
    dt = str(a.dtype)
    if dt not in _ELEMS:
        raise DtypeError(
            f"{name}: dtype {dt} is not supported (expected bool, float16, bfloat16, float32 or float64)"
        )
    a = np.ascontiguousarray(a)
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]
    return (a if a.dtype == np.bool_ else a.view(view)), _ELEMS[dt], dt


_ELEMS = {"bool": "bool", "float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


def simulate_matrix(
    mask_or_weight: Any,
    mode: str = "reference",
    *,
    name: str = "matrix",
    kind: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Simulates one 2-D weight or keep-mask (numpy or torch; bool, float16, bfloat16, float32,
    float64; numpy buffers are read in place). ``kind`` is the projection type (the default is
    guessed from ``name``; ``"down"`` matrices wider than tall are split into column chunks).
    Returns the matrix report: ``cycles``, ``dense_cycles``, ``speedup``, ``flops``,
    ``sparsity``, ``dense_columns``, ``threshold_ratios``, per-chunk details and, in full mode,
    ``full`` (decode / prefill)."""
    params = sim_params(mode, **options)
    arr, elem, dt = _as_array(mask_or_weight, name)
    if kind is None:
        planned = json.loads(
            _native.plan_json(json.dumps([{"name": name, "shape": list(arr.shape), "dtype": dt}]))
        )
        kind = planned["planned"][0]["kind"] if planned["planned"] else name
    return json.loads(_native.simulate_array_json(arr, elem, name, kind, dt, json.dumps(params)))


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="matrix")


def _select(
    planned: list[dict[str, Any]], tensors: list[dict[str, Any]], layers: str | None
) -> list[str]:
    if layers is None:
        return [p["name"] for p in planned]
    try:
        rx = re.compile(layers)
    except re.error as e:
        raise ConfigError(f"--layers: invalid regular expression {layers!r}: {e}") from None
    return [t["name"] for t in tensors if len(t["shape"]) == 2 and rx.search(t["name"])]


def simulate(
    model: Any,
    mode: str = "reference",
    *,
    layers: str | None = None,
    progress: bool = False,
    batch: int | None = None,
    on_matrix: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Simulates every decoder-block linear weight of a model.

    ``model``: a Hugging Face model directory or safetensors file (read by Rust through mmap),
    a ``torch.nn.Module``, or a state dict (name -> tensor/array). ``layers``: a regular
    expression; only 2-D tensors whose name matches are simulated (default: the 2-D
    ``*weight`` tensors of numbered blocks, or every 2-D tensor of a file without blocks).
    ``options``: see :func:`sim_params` (``pe_width``, ``pe_height``, ``float_mode``, full-mode
    hardware). Returns ``{"mode", "path", "params", "matrices", "summary", "totals",
    "skipped"}``."""
    params = sim_params(mode, **options)
    pjson = json.dumps(params)
    matrices: list[dict[str, Any]] = []
    if isinstance(model, (str, os.PathLike)):
        src = _native.SimSource(os.fspath(model))
        info = json.loads(src.plan_json())
        names = _select(info["planned"], info["tensors"], layers)
        skipped = info["skipped"]
        path = info["path"]
        if not names:
            raise ConfigError(_nothing(path, layers))
        step = batch or max(2, 2 * (os.cpu_count() or 1))
        bar = _progress(len(names), progress, "simulate")
        try:
            for i in range(0, len(names), step):
                got = json.loads(src.simulate_json(names[i : i + step], pjson))
                for m in got:
                    if on_matrix is not None:
                        on_matrix(m)
                matrices.extend(got)
                if bar is not None:
                    bar.update(len(got))
        finally:
            if bar is not None:
                bar.close()
    else:
        tensors = _state_dict(model)
        path = type(model).__name__
        metas = [
            {"name": k, "shape": list(v.shape), "dtype": str(getattr(v, "dtype", "?"))}
            for k, v in tensors.items()
        ]
        info = json.loads(_native.plan_json(json.dumps(metas)))
        names = _select(info["planned"], metas, layers)
        skipped = info["skipped"]
        if not names:
            raise ConfigError(_nothing(path, layers))
        kinds = {p["name"]: p["kind"] for p in info["planned"]}
        bar = _progress(len(names), progress, "simulate")
        try:
            for n in names:
                arr, elem, dt = _as_array(tensors[n], n)
                kind = (
                    kinds.get(n)
                    or json.loads(
                        _native.plan_json(
                            json.dumps([{"name": n, "shape": list(arr.shape), "dtype": dt}])
                        )
                    )["planned"][0]["kind"]
                )
                m = json.loads(_native.simulate_array_json(arr, elem, n, kind, dt, pjson))
                if on_matrix is not None:
                    on_matrix(m)
                matrices.append(m)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    matrices.sort(
        key=lambda m: (m["layer"] is None, m["layer"] or 0, _type_key(m["kind"]), m["name"])
    )
    agg = json.loads(_native.summarize_json(json.dumps(matrices)))
    return {
        "mode": mode,
        "path": path,
        "params": params,
        "matrices": matrices,
        "summary": _ordered(agg["summary"]),
        "totals": agg["totals"],
        "skipped": skipped,
    }


def _nothing(path: str, layers: str | None) -> str:
    if layers is None:
        return f"{path}: no 2-D weight to simulate in this model"
    return f"{path}: no 2-D tensor matches --layers {layers!r}"


def _state_dict(model: Any) -> Mapping[str, Any]:
    if isinstance(model, Mapping):
        return model
    sd = getattr(model, "state_dict", None)
    if callable(sd):
        return sd()
    raise ConfigError(
        f"simulate() takes a model path, a torch.nn.Module or a state dict, not {type(model).__name__}"
    )


def _type_key(kind: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER), kind)


def _ordered(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in sorted(summary, key=_type_key)}


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
    for kind in sorted(series, key=_type_key):
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

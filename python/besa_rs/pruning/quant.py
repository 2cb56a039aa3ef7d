"""Weight quantization that composes with sparsity masks (docs/pruning.md, "Quantization").

One idea: an asymmetric uniform integer grid per output row and group of ``G`` consecutive input
columns (``G = -1``: the whole row), ``N`` bits (2..8), and the three ways besa-rs puts weights
on it:

* round-to-nearest (RTN) with plain min/max (``rtn``), used after magnitude / Wanda masks;
* GPTQ, i.e. quantization inside SparseGPT's OBS pass with error feedback
  (:func:`sparsegpt_quant_prune` over ``baselines.sparsegpt_prune(..., quantizer=...)``), used as
  the "SparseGPT joint" baseline (mask chosen in the pass) and as the quantization-aware refit of
  ``--reconstruct`` (mask given);
* learned weight clipping in the style of OmniQuant (``fake_quant``, :class:`BlockClip`),
  optimised in BESA's block-wise loop together with the sparsity logits.

The grid of one group ``W_g`` (its pruned entries already 0), with clipping strengths
``s1 = sigmoid(g1)``, ``s0 = sigmoid(g0)`` (both 1 for RTN / GPTQ)::

    hi = s1 * max(max(W_g), 0)        lo = s0 * min(min(W_g), 0)      (0 always in range)
    scale = (hi - lo) / (2^N - 1)     (1 for an all-zero group), stored in the model's dtype
    z     = clamp(-round(lo / scale), 0, 2^N - 1)                     (integer zero point)
    q     = clamp(round(W / scale) + z, 0, 2^N - 1)                   (unsigned code)
    W^    = (q - z) * scale          computed in the model's dtype

Because ``z`` is an integer, a pruned weight (0) gets ``q = z`` and dequantizes to exactly 0.
``W^`` is computed exactly as compressed-tensors' dequantization computes it (integer
difference cast to the scale's dtype, times the scale, one rounding), so the saved weights are
the exact values a packed file decompresses to. Codes, scales and zero points are kept per
layer (:class:`QuantParams`, attached to the ``nn.Linear`` while a run lasts) and written to
``quantization.safetensors`` next to the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import FormatError, NumericalError, first_line
from .config import QuantSpec, spec_of
from .registry import Method, register

if TYPE_CHECKING:
    from .besa import ParamGroup
    from .context import BlockContext

#: initial clipping logit: sigmoid(4.0) = 0.982, i.e. about 2% clipping of max and min at the
#: start (OmniQuant's initialisation); the logits are fp32 parameters
CLIP_INIT_LOGIT = 4.0
#: side file of a saved model directory holding codes, scales and zero points
QUANT_FILE = "quantization.safetensors"
#: attribute under which a quantized ``nn.Linear`` carries its :class:`QuantParams` during a run
ATTR = "besa_quant"
FORMAT_NAME = "besa-rs-quant"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# the grid (its spec, QuantSpec, lives with the settings: config.py)
@dataclass
class QuantParams:
    """One quantized weight matrix ``[rows, cols]``: unsigned codes (uint8), per (row, group)
    scales (the weight's dtype) and unsigned integer zero points (uint8); ``group_size`` as set
    (-1 = whole row)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, dtype or self.scale.dtype)

    def to(self, device: torch.device | str) -> QuantParams:
        return dataclasses.replace(
            self,
            codes=self.codes.to(device),
            scale=self.scale.to(device),
            zero=self.zero.to(device),
        )


def _grouped(W: torch.Tensor, width: int) -> torch.Tensor:
    rows, cols = W.shape
    return W.reshape(rows, cols // width, width)


def _expand(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[rows, groups]`` -> ``[rows, groups * width]``."""
    return t.repeat_interleave(width, dim=1)


def clip_strengths(
    clip_logits: torch.Tensor | None,
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(s1, s0)`` = sigmoid of the max- and min-side logits ``[2, rows, groups]`` (1, 1 when
    there are none)."""
    if clip_logits is None:
        return 1.0, 1.0
    s = torch.sigmoid(clip_logits.float())
    return s[0], s[1]


def grid_params(
    hi: torch.Tensor, lo: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32 holding a value of ``dtype``) and integer zero point (fp32 holding an
    integer in ``[0, 2^N - 1]``) of groups with clipped bounds ``hi >= 0 >= lo``."""
    rng = (hi - lo).float()
    scale = torch.where(rng > 0, rng / spec.qmax, torch.ones_like(rng))
    tiny = torch.finfo(dtype).tiny
    scale = scale.to(dtype).float().clamp_min(tiny)  # a value the model's dtype holds exactly
    zero = torch.clamp(-torch.round(lo.float() / scale), 0, spec.qmax)
    return scale, zero


def codes_for(
    W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Unsigned codes (fp32 holding integers) of ``W`` on per-column ``scale`` / ``zero``."""
    return torch.clamp(torch.round(W.float() / scale) + zero, 0, spec.qmax)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(q - z) * scale`` per group, computed in ``dtype`` as compressed-tensors does (the
    integer difference is exact in every float dtype for ``N <= 8``)."""
    rows, cols = codes.shape
    width = cols // scale.shape[1]
    out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    for a, b in _row_chunks(rows, cols):  # one chunk's int32 and expanded temporaries
        diff = codes[a:b].to(torch.int32) - _expand(zero[a:b].to(torch.int32), width)
        torch.mul(diff.to(dtype), _expand(scale[a:b].to(dtype), width), out=out[a:b])
    return out


#: weights per row chunk of :func:`rtn`, :func:`search_clip_logits` and :func:`dequantize`: they
#: work group by group, so a chunk of rows at a time gives the same values with one chunk's
#: float32 temporaries (a LLaMA-7B MLP layer's whole-layer float32 copies took 0.18 GB each)
ROW_CHUNK_ELEMS = 1 << 20


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, ROW_CHUNK_ELEMS // max(cols, 1))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def rtn(
    W: torch.Tensor,
    spec: QuantSpec,
    clip_logits: torch.Tensor | None = None,
    name: str = "",
) -> QuantParams:
    """Round-to-nearest of ``W`` (pruned entries already 0) with plain min/max, or with learned
    clipping when ``clip_logits`` ``[2, rows, groups]`` are given. Scales in ``W``'s dtype.
    A chunk of rows at a time (:data:`ROW_CHUNK_ELEMS`)."""
    rows, cols = W.shape
    width = spec.group_width(cols, name)
    dev = W.device
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=dev)
    scales = torch.empty((rows, cols // width), dtype=W.dtype, device=dev)
    zeros = torch.empty((rows, cols // width), dtype=torch.uint8, device=dev)
    s1, s0 = clip_strengths(None if clip_logits is None else clip_logits.detach())
    for a, b in _row_chunks(rows, cols):
        Wf = W[a:b].detach().float()
        g = _grouped(Wf, width)
        hi = (s1[a:b] if isinstance(s1, torch.Tensor) else s1) * g.amax(-1).clamp_min(0)
        lo = (s0[a:b] if isinstance(s0, torch.Tensor) else s0) * g.amin(-1).clamp_max(0)
        scale, zero = grid_params(hi, lo, spec, W.dtype)
        codes[a:b] = codes_for(Wf, _expand(scale, width), _expand(zero, width), spec)
        scales[a:b] = scale
        zeros[a:b] = zero
    return QuantParams(
        codes=codes, scale=scales, zero=zeros, bits=spec.bits, group_size=spec.group_size
    )


# ---------------------------------------------------------------------------------------------
# learned clipping (OmniQuant's LWC) with straight-through rounding
def ste_code(u: torch.Tensor, offset: torch.Tensor, qmax: int) -> torch.Tensor:
    """``clamp(round(u) + offset, 0, qmax)`` in value (exact integers; ``offset`` integer
    valued), and in gradient the identity of ``u + offset`` where the rounded code lies inside
    ``[0, qmax]`` (bounds included), 0 where it is clamped: rounding passed straight through.
    The clamp decision is taken on the exact integer code, not on ``u + (round(u) - u)`` whose
    floating-point value may step over a bound."""
    r = torch.round(u.detach()) + offset.detach()
    inside = (r >= 0) & (r <= qmax)
    v = u + offset
    return r.clamp(0, qmax) + (v - v.detach()) * inside


#: shrink factors tried by :func:`search_clip_logits`, from the largest the logits can start
#: at (``sigmoid(CLIP_INIT_LOGIT)``) down to this one
CLIP_SEARCH_MIN = 0.5
CLIP_SEARCH_STEPS = 25


def search_clip_logits(
    W: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Initial clipping logits ``[2, rows, groups]`` (fp32, leaf) found by a search: per group
    the common shrink ``s`` (``s1 = s0 = s``) among ``CLIP_SEARCH_STEPS`` values from
    ``sigmoid(CLIP_INIT_LOGIT)`` down to ``CLIP_SEARCH_MIN`` whose round-to-nearest error
    ``sum_j col_weight_j (W_ij - W^_ij)^2`` over the group is smallest (``col_weight``: the
    squared input norms per column, so the sum is the layer's output error with uncorrelated
    inputs; None: plain squared error); ties go to the larger ``s``. ``W``: the weight with its
    pruned entries 0. Returns ``logit(s)``."""
    rows, cols = W.shape
    width = spec.group_width(cols)
    cw = (
        torch.ones(cols, device=W.device)
        if col_weight is None
        else col_weight.detach().float().to(W.device).clamp_min(0)
    )
    cw = cw.reshape(1, cols // width, width)
    top = torch.sigmoid(torch.tensor(CLIP_INIT_LOGIT)).item()
    shrinks = torch.linspace(top, CLIP_SEARCH_MIN, CLIP_SEARCH_STEPS).tolist()
    best = torch.empty((rows, cols // width), device=W.device)
    for a, b in _row_chunks(rows, cols):  # groups are independent: a chunk of rows at a time
        g = _grouped(W[a:b].detach().float(), width)
        gmax, gmin = g.amax(-1).clamp_min(0), g.amin(-1).clamp_max(0)
        best_err = torch.full(gmax.shape, float("inf"), device=W.device)
        best_c = torch.full(gmax.shape, top, device=W.device)
        for s in shrinks:
            hi, lo = s * gmax, s * gmin
            rng = hi - lo
            scale = torch.where(rng > 0, rng / spec.qmax, torch.ones_like(rng)).unsqueeze(-1)
            zero = torch.clamp(-torch.round(lo.unsqueeze(-1) / scale), 0, spec.qmax)
            q = torch.clamp(torch.round(g / scale) + zero, 0, spec.qmax)
            err = (((q - zero) * scale - g) ** 2 * cw).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_c = torch.where(better, torch.full_like(best_c, s), best_c)
        best[a:b] = best_c
    logit = torch.logit(best.clamp(1e-6, 1 - 1e-6))
    return torch.stack([logit, logit]).contiguous().requires_grad_(True)


def init_clip_logits(rows: int, groups: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Learnable clipping logits ``[2, rows, groups]`` (index 0: max side ``g1``, 1: min side
    ``g0``), fp32, all ``CLIP_INIT_LOGIT``."""
    return torch.full(
        (2, rows, groups), CLIP_INIT_LOGIT, dtype=torch.float32, device=device
    ).requires_grad_(True)


def fake_quant(W: torch.Tensor, clip_logits: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable quantize-dequantize of ``W`` (fp32 arithmetic, result in ``W``'s dtype):
    the grid above with ``round`` passed straight through (in ``q`` and in ``z``, see
    :func:`ste_code`; zero gradient where a code is clamped); fp64 when ``W`` is fp64.
    Gradients reach ``W``
    (hence BESA's mask logits) and the clipping logits. Scales are not rounded to the model's
    dtype here (training only)."""
    rows, cols = W.shape
    width = cols // clip_logits.shape[2]
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    g = _grouped(W.to(acc), width)
    s = torch.sigmoid(clip_logits.to(acc))
    hi = s[0] * g.amax(-1).clamp_min(0)
    lo = s[1] * g.amin(-1).clamp_max(0)
    scale = ((hi - lo) / spec.qmax).clamp_min(1e-12).unsqueeze(-1)
    zero = ste_code(-lo.unsqueeze(-1) / scale, torch.zeros_like(scale), spec.qmax)
    q = ste_code(g / scale, zero, spec.qmax)
    return ((q - zero) * scale).reshape(rows, cols).to(W.dtype)


# ---------------------------------------------------------------------------------------------
# GPTQ: quantization inside SparseGPT's OBS pass
class ColumnQuantizer:
    """Quantizes a weight matrix column by column inside ``sparsegpt_prune``'s pass: when the pass
    reaches a group's first column, the group's scale and zero point are computed from the
    current (error-updated) weights of the group's columns, with the entries known to be pruned
    set to 0 (with a given mask all of them; with a mask chosen in the pass, those of the current
    column block); each column's kept weights then take their grid values and the pass feeds the
    quantization error forward. Records codes, scales and zero points."""

    def __init__(
        self,
        spec: QuantSpec,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        clip_logits: torch.Tensor | None = None,
        name: str = "",
    ):
        rows, cols = shape
        self.spec = spec
        self.width = spec.group_width(cols, name)
        self.dtype = dtype
        groups = cols // self.width
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self.scale = torch.ones(rows, groups, dtype=torch.float32, device=device)
        self.zero = torch.zeros(rows, groups, dtype=torch.float32, device=device)
        self.s1, self.s0 = clip_strengths(
            None if clip_logits is None else clip_logits.detach().to(device)
        )

    def column(
        self,
        c: int,
        q: torch.Tensor,
        W: torch.Tensor,
        W1: torch.Tensor,
        Err1: torch.Tensor,
        Hinv: torch.Tensor,
        prune1: torch.Tensor,
        mask: torch.Tensor | None,
        i1: int,
    ) -> torch.Tensor:
        """Grid values of column ``c`` (``q``: the column with its pruned entries 0). ``W``: the
        full matrix (columns from the current block's end on updated up to the previous block),
        ``W1`` / ``Err1`` / ``prune1``: the current block's updated weights, errors so far and
        pruned entries, ``Hinv``: the full upper Cholesky factor, ``i1``: the block's first
        column, ``mask``: the given keep mask or None."""
        if c % self.width == 0:
            self._begin_group(c, W, W1, Err1, Hinv, prune1, mask, i1)
        k = c // self.width
        scale, zero = self.scale[:, k], self.zero[:, k]
        code = codes_for(q, scale, zero, self.spec)
        self.codes[:, c] = code.to(torch.uint8)
        return (code - zero) * scale  # exact in fp32: an integer <= 255 times a scale

    def _begin_group(
        self,
        c: int,
        W: torch.Tensor,
        W1: torch.Tensor,
        Err1: torch.Tensor,
        Hinv: torch.Tensor,
        prune1: torch.Tensor,
        mask: torch.Tensor | None,
        i1: int,
    ) -> None:
        i = c - i1
        count = W1.shape[1]
        end = c + self.width
        i2 = i1 + count
        inside = W1[:, i : min(count, i + self.width)] * ~prune1[:, i : min(count, i + self.width)]
        parts = [inside]
        if end > i2:
            # later blocks: apply the current block's pending update (errors of columns < c)
            later = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:c, i2:end]
            if mask is not None:
                later = later * mask[:, i2:end].to(later.device)
            parts.append(later)
        g = torch.cat(parts, dim=1)
        k = c // self.width
        s1 = self.s1 if isinstance(self.s1, float) else self.s1[:, k]
        s0 = self.s0 if isinstance(self.s0, float) else self.s0[:, k]
        scale, zero = grid_params(
            s1 * g.amax(1).clamp_min(0), s0 * g.amin(1).clamp_max(0), self.spec, self.dtype
        )
        self.scale[:, k] = scale
        self.zero[:, k] = zero

    def params(self) -> QuantParams:
        return QuantParams(
            codes=self.codes,
            scale=self.scale.to(self.dtype),
            zero=self.zero.to(torch.uint8),
            bits=self.spec.bits,
            group_size=self.spec.group_size,
        )


def sparsegpt_quant_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    sparsity: float = 0.0,
    n: int = 0,
    m: int = 0,
    mask: torch.Tensor | None = None,
    clip_logits: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, QuantParams]:
    """SparseGPT's joint pass: prune (mask chosen, or ``mask`` imposed) and quantize in one OBS
    pass (GPTQ with ``sparsity = 0``). Returns (weight on the grid in ``weight``'s dtype, keep
    mask, quantization parameters); the weight equals ``params.dequantize()`` exactly."""
    from .baselines import sparsegpt_prune

    qz = ColumnQuantizer(
        spec, (weight.shape[0], weight.shape[1]), weight.dtype, weight.device, clip_logits, name
    )
    _, keep = sparsegpt_prune(
        weight,
        hessian,
        sparsity,
        n,
        m,
        mask=mask,
        blocksize=blocksize,
        percdamp=percdamp,
        name=name,
        quantizer=qz,
    )
    params = qz.params()
    if not torch.isfinite(params.scale.float()).all():
        raise NumericalError(f"layer {name}: GPTQ produced non-finite scales")
    return params.dequantize(weight.dtype), keep, params


# ---------------------------------------------------------------------------------------------
# a layer's final quantization, attached to the module
def attach(lin: nn.Linear, params: QuantParams) -> dict[str, Any]:
    """Writes the grid values into ``lin.weight``, keeps ``params`` (on the CPU) on the module and
    returns the layer's report entries."""
    with torch.no_grad():
        lin.weight.copy_(params.dequantize(lin.weight.dtype))
    setattr(lin, ATTR, params.to("cpu"))
    return {
        "wbits": params.bits,
        "group_size": params.group_size,
        "zero_fraction": 1.0 - int(torch.count_nonzero(lin.weight)) / lin.weight.numel(),
    }


def finish_layer(
    cfg: Any,
    lin: nn.Linear,
    keep: torch.Tensor,
    info: dict[str, Any],
    name: str,
    gptq: ColumnQuantizer | None = None,
    hessian: torch.Tensor | None = None,
) -> None:
    """Baselines: RTN of the masked weight (magnitude, Wanda), or the parameters recorded by the
    joint SparseGPT pass (``gptq``), or, with ``hessian`` (a refit for ``--reconstruct``), the
    GPTQ pass over the (refitted) weight with ``keep`` imposed; adds the quantization entries to
    the layer's ``info``. A no-op when ``cfg.wbits`` is None."""
    spec = spec_of(cfg)
    if spec is None:
        return
    if gptq is not None:
        params = gptq.params()
        if not torch.equal(lin.weight.detach(), params.dequantize(lin.weight.dtype)):
            raise NumericalError(
                f"layer {name}: the joint SparseGPT pass left weights off the grid"
            )
    elif hessian is not None:
        _, _, params = sparsegpt_quant_prune(
            lin.weight.detach() * keep.to(lin.weight.dtype),
            hessian,
            spec,
            mask=keep,
            blocksize=cfg.blocksize,
            percdamp=cfg.percdamp,
            name=name,
        )
    else:
        params = rtn(lin.weight.detach() * keep.to(lin.weight.dtype), spec, name=name)
    info.update(attach(lin, params))


def column_quantizer(cfg: Any, weight: torch.Tensor, name: str) -> ColumnQuantizer | None:
    """The quantizer for SparseGPT's joint pass (plain min/max), or None without ``wbits``."""
    spec = spec_of(cfg)
    if spec is None:
        return None
    return ColumnQuantizer(
        spec, (weight.shape[0], weight.shape[1]), weight.dtype, weight.device, None, name
    )


# ---------------------------------------------------------------------------------------------
# BESA: learned clipping of every linear of a block
class BlockClip:
    """Learned clipping logits of a block's linear layers, optimised in BESA's loop."""

    def __init__(self, spec: QuantSpec, logits: dict[str, torch.Tensor]):
        self.spec = spec
        self.logits = logits

    @classmethod
    def create(
        cls,
        cfg: Any,
        weights: Mapping[str, torch.Tensor],
        device: torch.device,
        block: int,
        col_weights: dict[str, torch.Tensor | None] | None = None,
    ) -> BlockClip | None:
        """Clipping logits for ``weights`` (``{name: W}``, pruned entries 0 as the first step
        will mask them; each looked up once, in turn): all ``CLIP_INIT_LOGIT``, or with
        ``cfg.clip_init == "search"`` those of :func:`search_clip_logits` weighted by
        ``col_weights[name]`` (squared input norms; None: unweighted)."""
        spec = spec_of(cfg)
        if spec is None:
            return None
        logits = {}
        for n, W in weights.items():
            rows, cols = W.shape
            width = spec.group_width(cols, f"block {block} {n}")
            if getattr(cfg, "clip_init_mode", "fixed") == "search":
                cw = (col_weights or {}).get(n)
                logits[n] = search_clip_logits(W.to(device), spec, cw).to(device)
                logits[n] = logits[n].detach().requires_grad_(True)
            else:
                logits[n] = init_clip_logits(rows, cols // width, device)
        return cls(spec, logits)

    def param_group(self, cfg: Any) -> ParamGroup:
        """The clipping logits as a parameter group of BESA's loop (``besa.optimise_block``):
        rate ``cfg.clip_learning_rate`` at the reference step count, turned into a rate per
        step by the same step budget as the sparsity logits' (AdamW)."""
        from .besa import ParamGroup

        return ParamGroup("clip_lr", list(self.logits.values()), cfg.clip_learning_rate)

    def fake_quant(self, masked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight": W * M}`` -> the same with every weight fake-quantized."""
        return {
            k: fake_quant(w, self.logits[k[: -len(".weight")]], self.spec)
            for k, w in masked.items()
        }

    def strengths(self, n: str) -> dict[str, float]:
        s = torch.sigmoid(self.logits[n].detach().float())
        return {
            "clip_max_mean": float(s[0].mean()),
            "clip_min_mean": float(s[1].mean()),
            "clip_max_min": float(s[0].min()),
            "clip_min_min": float(s[1].min()),
        }

    def finish(
        self,
        n: str,
        lin: nn.Linear,
        keep: torch.Tensor,
        hessian: torch.Tensor | None,
        cfg: Any,
        block: int,
    ) -> dict[str, Any]:
        """Final quantization of the (masked, possibly refitted) weight with the learned clipping:
        RTN, or with ``hessian`` (``--reconstruct``) the quantization-aware refit: SparseGPT's
        joint pass with the mask imposed, quantizing column by column and feeding each
        quantization error forward onto the kept weights not yet quantized."""
        name = f"block {block} {n}"
        W = lin.weight.detach() * keep.to(lin.weight.dtype)
        if hessian is None:
            params = rtn(W, self.spec, self.logits[n], name=name)
        else:
            _, _, params = sparsegpt_quant_prune(
                W,
                hessian,
                self.spec,
                mask=keep,
                clip_logits=self.logits[n],
                blocksize=cfg.blocksize,
                percdamp=cfg.percdamp,
                name=name,
            )
        return {**attach(lin, params), **self.strengths(n)}


def prune_block_clip_only(ctx: BlockContext) -> dict[str, Any]:
    """BESA's block-wise loop without masks (``sparsity = 0``, ``wbits`` set): learned clipping
    alone, on the same reconstruction loss and in the same loop (``besa.optimise_block``: loss
    scaling, step budget), then RTN with the learned clipping (or, with ``reconstruct``, the
    refit every method gets, which with nothing pruned only zeroes dead input columns, then the
    GPTQ pass with the learned clipping)."""
    from .baselines import refit_layer
    from .besa import first_batch_reconstruction, optimise_block

    cfg = ctx.cfg
    names = list(ctx.linears)
    search = cfg.clip_init_mode == "search"
    stats, targets = ctx.run_with_stats(ctx.xs, search, cfg.reconstruct, keep_outputs=True)
    weights = {n: ctx.linears[n].weight.detach() for n in names}
    norms = {n: stats[n].sq_norm for n in names} if search else None
    clip = BlockClip.create(cfg, weights, ctx.device, ctx.index, norms)
    assert clip is not None

    def quantized_weights() -> dict[str, torch.Tensor]:
        return clip.fake_quant({f"{n}.weight": weights[n] for n in names})

    loop = optimise_block(ctx, targets, [clip.param_group(cfg)], quantized_weights, what="clipping")
    first = slice(0, cfg.batch_size)
    first_target = torch.cat(targets[first], dim=0)
    del targets
    layers = []
    with torch.no_grad():
        for n in names:
            lin = ctx.linears[n]
            keep = torch.ones_like(lin.weight, dtype=torch.bool)
            dead: dict[str, Any] = {}
            H = None
            if cfg.reconstruct:
                H = stats[n].hessian
                keep, dead = refit_layer(lin.weight, keep, H, cfg, f"block {ctx.index} {n}")
            q = clip.finish(n, lin, keep, H, cfg, ctx.index)
            layers.append(
                {
                    "name": n,
                    "shape": list(lin.weight.shape),
                    "params": lin.weight.numel(),
                    "target_sparsity": 0.0,
                    "realised_sparsity": 1.0 - float(keep.float().mean()),
                    **dead,
                    **q,
                }
            )
        rec_after = first_batch_reconstruction(ctx, first_target)
    del stats
    return {
        "layers": layers,
        **loop.report(),
        "first_sample_reconstruction": [loop.recs[0] if loop.recs else float("nan"), rec_after],
    }


# ---------------------------------------------------------------------------------------------
# checkpoint and output
def _key(name: str, part: str) -> str:
    return f"{name}.{part}"


def layer_tensors(name: str, params: QuantParams) -> dict[str, torch.Tensor]:
    """Tensors of one layer's parameters under ``<name>.weight_codes`` (uint8, unsigned),
    ``<name>.weight_scale`` (model dtype) and ``<name>.weight_zero_point`` (uint8, unsigned)."""
    return {
        _key(name, "weight_codes"): params.codes.contiguous(),
        _key(name, "weight_scale"): params.scale.contiguous(),
        _key(name, "weight_zero_point"): params.zero.contiguous(),
    }


def block_tensors(linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Quantization tensors of a block's linears, for the block's checkpoint file."""
    out: dict[str, torch.Tensor] = {}
    for name, lin in linears.items():
        p = getattr(lin, ATTR, None)
        if p is not None:
            out.update(layer_tensors(name, p))
    return out


def restore_block(
    linears: dict[str, nn.Linear], tensors: dict[str, torch.Tensor], spec: QuantSpec | None
) -> None:
    """Re-attaches the parameters saved by :func:`block_tensors` (resume)."""
    if spec is None:
        return
    for name, lin in linears.items():
        key = _key(name, "weight_codes")
        if key not in tensors:
            raise FormatError(f"checkpoint: quantization tensors of {name!r} missing")
        setattr(
            lin,
            ATTR,
            QuantParams(
                codes=tensors[key],
                scale=tensors[_key(name, "weight_scale")],
                zero=tensors[_key(name, "weight_zero_point")],
                bits=spec.bits,
                group_size=spec.group_size,
            ),
        )


def collect(model: nn.Module) -> dict[str, QuantParams]:
    """``{"<module path>.weight": params}`` of every quantized linear of ``model``."""
    return {
        f"{name}.weight": getattr(mod, ATTR)
        for name, mod in model.named_modules()
        if getattr(mod, ATTR, None) is not None
    }


def write_quant_file(model: nn.Module, directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Writes ``quantization.safetensors`` into ``directory`` (atomically) when ``model`` has
    quantized layers; returns its summary for the report (None otherwise)."""
    from safetensors.torch import save_file

    from .._io import atomic_path

    params = collect(model)
    if not params:
        return None
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for wname, p in params.items():
        base = wname[: -len(".weight")]
        tensors.update(layer_tensors(base, p))
        layers[wname] = {"bits": p.bits, "group_size": p.group_size, "shape": list(p.codes.shape)}
    meta = file_metadata(layers)
    path = Path(directory) / QUANT_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return file_summary(meta)


def file_metadata(layers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The string metadata of ``quantization.safetensors`` for ``layers``
    (``{"<module path>.weight": {"bits", "group_size", "shape"}}``, in module order)."""
    bits = {li["bits"] for li in layers.values()}
    groups = {li["group_size"] for li in layers.values()}
    return {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "bits": json.dumps(sorted(bits)[0] if len(bits) == 1 else sorted(bits)),
        "group_size": json.dumps(sorted(groups)[0] if len(groups) == 1 else sorted(groups)),
        "symmetric": "false",
        "layers": json.dumps(layers),
    }


def file_summary(meta: dict[str, str]) -> dict[str, Any]:
    """The report's summary of a ``quantization.safetensors`` with metadata ``meta``."""
    return {
        "file": QUANT_FILE,
        "format": FORMAT_NAME,
        "bits": json.loads(meta["bits"]),
        "group_size": json.loads(meta["group_size"]),
        "layers": len(json.loads(meta["layers"])),
    }


def read_quant_file(directory: str | os.PathLike[str]) -> dict[str, QuantParams]:
    """Reads ``quantization.safetensors`` of a saved model directory back into
    ``{"<module path>.weight": params}``."""
    from safetensors import safe_open

    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        raise FormatError(f"{path}: no quantization parameters (the model was not quantized)")
    out: dict[str, QuantParams] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME:
                raise FormatError(f"{path}: not a {FORMAT_NAME} file")
            layers = json.loads(meta["layers"])
            for wname, li in layers.items():
                base = wname[: -len(".weight")]
                p = QuantParams(
                    codes=f.get_tensor(_key(base, "weight_codes")),
                    scale=f.get_tensor(_key(base, "weight_scale")),
                    zero=f.get_tensor(_key(base, "weight_zero_point")),
                    bits=int(li["bits"]),
                    group_size=int(li["group_size"]),
                )
                rows, cols = p.codes.shape
                if (
                    p.scale.shape != p.zero.shape
                    or p.scale.shape[0] != rows
                    or cols % p.scale.shape[1]
                ):
                    raise FormatError(f"{path}: inconsistent shapes for {wname}")
                out[wname] = p
    except FormatError:
        raise
    except Exception as e:  # missing tensor or key, bad JSON, unreadable file
        raise FormatError(
            f"{path}: unreadable quantization parameters ({type(e).__name__}: {first_line(e)})"
        ) from None
    return out


# BESA with wbits and sparsity 0: learned clipping alone
register(
    Method(
        "besa",
        prune_block_clip_only,
        learned=True,
        when=lambda cfg: cfg.wbits is not None and cfg.sparsity == 0,
    )
)

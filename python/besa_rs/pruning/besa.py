"""BESA for one transformer block (docs/pruning.md, "BESA, as implemented"), in the steps of
the BESA paper's algorithm: 1-3 target and importance statistics, 4-6 ranks, candidate
sparsities and logits, 7-10 optimisation, 11 hard masks with the exact block sparsity.

Weights stay frozen; per linear layer we learn logits over candidate sparsities (one vector per
output row, per group of K rows, or per layer). The block's forward uses ``W * M`` with ``M``
the straight-through mask of :mod:`besa_rs.ste`; the loss is the per-channel relative
reconstruction error of the block's output plus ``lambda`` times the squared relative deviation
of the block's expected sparsity from the target.

After optimisation the learned per-row rates are shifted by one common offset (found by
bisection) so that the block's realised sparsity equals the target (see docs/pruning.md,
"Exact sparsity"); then the hard masks are multiplied into the weights and, with
``reconstruct``, the kept weights of each layer are refitted to the layer's calibration inputs.

Precision: the logits, the soft mask's gradient accumulation, the loss and the optimiser state
are float32 whatever the model's dtype. When the block runs in float16 the loss is multiplied
by a dynamic scale before the backward pass (:class:`LossScaler`): the gradient reaching the
block's output is about ``2 e / (H L sigma)`` and would otherwise underflow float16 at LLaMA
widths. A step whose scaled gradients overflow is skipped and the scale halved; the scale
doubles after ``loss_scale_growth_interval`` good steps and carries over to the next block.

One optimisation loop (:func:`optimise_block`) serves every learned method: BESA (sparsity
logits), BESA joint with weight quantization (sparsity logits and clipping logits, two
parameter groups) and learned clipping alone (``sparsity = 0``, clipping logits only,
:func:`besa_rs.pruning.quant.prune_block_clip_only`). Loss scaling, the step-budget learning
rate (every parameter group) and the checks on non-finite losses and gradients are the same
for all of them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from .. import ste
from ..errors import NumericalError, ShapeError
from ..ste import codes as ste_codes
from . import distributed, heap, quant
from .baselines import refit_layer, sparsegpt_diag_sq, sparsegpt_saliency, wanda_score
from .context import BlockContext
from .registry import Method, register


def importance_rows(
    metric: str, weight: torch.Tensor, stats: Any, percdamp: float, name: str, device: torch.device
) -> Callable[[int, int], torch.Tensor]:
    """The importance metric of ``weight`` as a function of a row range ``(a, b)``: every
    metric is elementwise given the layer's statistics, so rows ``a:b`` are computed alone and
    the ranks are sorted a chunk at a time (:func:`besa_rs.ste.row_ranks_by_chunks`) without
    the whole layer's float32 score. Rows come on ``device``."""
    w = weight.detach()
    if metric == "wanda":
        norms = stats.sq_norm
        return lambda a, b: wanda_score(w[a:b], norms).to(device)
    if metric == "magnitude":
        return lambda a, b: w[a:b].float().abs().to(device)
    diag_sq = sparsegpt_diag_sq(stats.hessian, percdamp, name)
    return lambda a, b: sparsegpt_saliency(w[a:b], diag_sq).to(device)


#: each linear layer makes its masked (and fake-quantized) weight inside its own forward and
#: again, by activation checkpointing, in the backward pass: one layer's masked weight is held
#: at a time instead of the whole block's from the forward to the backward. The values and
#: the autograd graph are those of the masked weights made up front, so every gradient, logit
#: and mask is bit-identical either way (tests/test_besa.py); it costs one more mask forward
#: per layer and step (measured on SmolLM2-135M, CPU, fp32: +4.5% CPU time for the whole run),
#: so it is used where it saves memory that matters. ``None`` (auto): when the block's masked
#: weights in float32 would take more than :data:`RECOMPUTE_ABOVE_BYTES` (a LLaMA-7B block:
#: 0.81 GB; a SmolLM2-135M block: 14 MB); ``True`` / ``False`` force it.
RECOMPUTE_MASKED_WEIGHTS: bool | None = None
RECOMPUTE_ABOVE_BYTES = 256 << 20


def recompute_masked_weights(numel: int) -> bool:
    """Whether a block whose pruned linears hold ``numel`` weights makes each masked weight
    inside its layer's forward (see :data:`RECOMPUTE_MASKED_WEIGHTS`)."""
    if RECOMPUTE_MASKED_WEIGHTS is not None:
        return RECOMPUTE_MASKED_WEIGHTS
    return 4 * numel > RECOMPUTE_ABOVE_BYTES


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The masked weights are made outside autocast, as when they are made before the block
    runs."""
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def _release_after_backward(*_: Any) -> None:
    """A hook on the node that made a layer's masked weight: once its backward has run (the
    layer's masked weight, its gradient and the bucket sums' chunk buffers are freed), the
    freed heap pages go back to the system before the next layer's backward (heap.py)."""
    heap.release()


@contextlib.contextmanager
def recomputed_linears(
    linears: dict[str, nn.Linear],
    makers: dict[str, Callable[[], torch.Tensor]] | None,
    device: torch.device,
) -> Iterator[None]:
    """While the ``with`` body runs, the linear layer ``n`` of ``makers`` computes
    ``F.linear(x, makers[n](), bias)`` under :func:`torch.utils.checkpoint.checkpoint`: its
    weight is made when the layer runs and dropped after it; the backward pass makes it again
    from the same (not yet updated) parameters. After each layer's mask backward the freed heap
    pages are handed back (:func:`_release_after_backward`)."""

    def forward_of(lin: nn.Linear, make: Callable[[], torch.Tensor]) -> LinearForward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            def run(x: torch.Tensor) -> torch.Tensor:
                with _no_autocast(device):
                    w = make()
                if w.grad_fn is not None:
                    w.grad_fn.register_hook(_release_after_backward)
                return F.linear(x, w, lin.bias)

            return checkpoint(run, x, use_reentrant=False)  # type: ignore[no-any-return]

        return forward

    forwards = {n: forward_of(linears[n], make) for n, make in (makers or {}).items()}
    with patched_linears(linears, forwards):
        yield


#: a linear layer's forward in place of ``nn.Linear.forward``: input -> output
LinearForward = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def patched_linears(
    linears: dict[str, nn.Linear], forwards: dict[str, LinearForward] | None
) -> Iterator[None]:
    """While the ``with`` body runs, the linear layer ``n`` of ``forwards`` runs
    ``forwards[n]`` instead of its own forward (an instance attribute, removed afterwards)."""
    patched = []
    try:
        for n, fwd in (forwards or {}).items():
            lin = linears[n]
            object.__setattr__(lin, "forward", fwd)
            patched.append(lin)
        yield
    finally:
        for lin in patched:
            lin.__dict__.pop("forward", None)


#: BESA's low-memory path on the CPU (:mod:`besa_rs.ste.codes`): one byte of rank bucket per
#: weight instead of an int16 rank, and each linear layer's masked weight made a chunk of output
#: rows at a time in its forward and again in its backward (neither the masked weight nor its
#: gradient exists whole). Masks are exactly the ranks'; gradients agree with the ranks' path to
#: float rounding (the bucket sums add the same terms in column order), so runs agree with it
#: to rounding, not bit for bit. ``None`` (auto): on the lean memory path
#: (:func:`recompute_masked_weights`) when the block runs on the CPU, where host memory is the
#: model's (the CUDA kernels take ranks), and the candidates fit a byte; ``True`` / ``False``
#: force it (``True`` still needs the candidates to fit).
COMPACT_CODES: bool | None = None


def use_codes(lean: bool, device: torch.device, n_candidates: int) -> bool:
    """Whether a block uses bucket codes (see :data:`COMPACT_CODES`)."""
    if not ste_codes.fits(n_candidates):
        return False
    if COMPACT_CODES is not None:
        return COMPACT_CODES
    return lean and device.type == "cpu"


def groups_for(kind: str, k: int, rows: int, name: str) -> int:
    if kind == "row":
        return rows
    if kind == "layer":
        return 1
    if rows % k:
        raise ShapeError(
            f"layer {name}: row-block size K={k} does not divide its {rows} output rows"
        )
    return rows // k


def make_optimizer(
    params: list[torch.Tensor] | list[dict[str, Any]], cfg: Any, lr: float | None = None
) -> torch.optim.Optimizer:
    """A new optimiser over the (float32) logits: its state is float32 too. ``params``: tensors,
    or parameter groups (dicts with ``params`` and their own ``lr``)."""
    rate = cfg.learning_rate if lr is None else lr
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=rate, d_coef=cfg.d_coef, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=rate, weight_decay=0.0, eps=cfg.adam_epsilon)


#: smallest loss scale before non-finite gradients are reported as an error
MIN_LOSS_SCALE = 2.0**-24
#: largest loss scale (growth stops there)
MAX_LOSS_SCALE = 2.0**24


@dataclass
class LossScaler:
    """Dynamic loss scaling (the scheme of mixed-precision training): the loss is multiplied
    by ``scale`` before ``backward``; the float32 gradients of the logits are divided by it
    (exactly: the scale is a power of two) before the optimiser step. On a non-finite
    gradient the step is skipped and the scale halved; after ``growth_interval`` good steps in
    a row it doubles. Disabled, it is the plain loop (scale 1) and a non-finite gradient is an
    error."""

    enabled: bool
    scale: float = 65536.0
    growth_interval: int = 100
    good_steps: int = 0
    skipped: int = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.enabled else loss).backward()

    def unscale_and_check(self, params: list[torch.Tensor]) -> bool:
        """Divides the gradients by the scale; True when every gradient is finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        if self.enabled:
            inv = 1.0 / self.scale
            for g in grads:
                g.mul_(inv)
        return bool(torch.stack([g.isfinite().all() for g in grads]).all())

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale = min(self.scale * 2.0, MAX_LOSS_SCALE)
                self.good_steps = 0
        else:
            self.skipped += 1
            self.good_steps = 0
            self.scale *= 0.5


def output_grad_zero_fraction(
    y: torch.Tensor, y_hat: torch.Tensor, scale: float = 1.0, dtype: torch.dtype | None = None
) -> float:
    """Underflow of the gradient reaching the block output: among the entries of
    ``d(scale * relative_reconstruction(y, y_hat)) / d y_hat`` that are non-zero in float32,
    the fraction that is exactly zero when the gradient is held in ``dtype`` (default:
    ``y_hat``'s), as in the block's backward pass."""

    def grad(dt: torch.dtype) -> torch.Tensor:
        yh = y_hat.detach().to(dt).requires_grad_(True)
        (relative_reconstruction(y.to(dt), yh) * scale).backward()
        assert yh.grad is not None
        return yh.grad

    nonzero = grad(torch.float32) != 0
    lost = (grad(dtype or y_hat.dtype) == 0) & nonzero
    return float(lost.sum()) / max(int(nonzero.sum()), 1)


def relative_reconstruction(
    y: torch.Tensor, y_hat: torch.Tensor, n2: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_h sum_t ((Y - Y_hat)_th / n_h)^2`` with ``n_h`` = L2 norm of target channel h over
    the batch's tokens. ``n2`` (``n_h^2``, given): the norms of a larger batch this one is a
    part of (data-parallel ranks), so the parts' losses add up to the whole batch's."""
    y = y.float().reshape(-1, y.shape[-1])
    d = y - y_hat.float().reshape(-1, y.shape[-1])
    if n2 is None:
        n2 = (y * y).sum(0).clamp_min(1e-12)
    return ((d * d).sum(0) / n2).mean()


def first_batch_reconstruction(ctx: BlockContext, first_target: torch.Tensor) -> float:
    """:func:`relative_reconstruction` of the loop's first batch through the finished block
    (with the first step's value it shows whether the optimisation improved the block).
    ``first_target``: the targets of the first ``batch_size`` samples in ``ctx.xs``.

    Inside a process group each rank runs only its part of the first *global* batch (the
    samples of the loop's first step) and the parts, each normalised by the global batch's
    per-channel norms, are summed over the ranks: the single-process value on the same samples
    (to float rounding), for a rank's share of the work."""
    shard = ctx.shard
    sl = slice(0, first_target.shape[0]) if shard is None else shard.steps[0]
    y = first_target[: sl.stop - sl.start].to(ctx.device)
    what = f"block {ctx.index}'s final reconstruction"
    n2 = None
    if shard is not None:
        yf = y.float().reshape(-1, y.shape[-1])
        n2 = distributed.all_sum((yf * yf).sum(0), "loss norms", what).clamp_min(1e-12)
    if sl.stop > sl.start:
        y_hat = ctx.forward(ctx.batch(ctx.xs, sl))
        part = (
            relative_reconstruction(y, y_hat)
            if n2 is None
            else relative_reconstruction(y, y_hat, n2)  # the global batch's norms
        )
    else:  # no part of the first batch on this rank (not with check_world's settings)
        part = torch.zeros((), device=ctx.device)
    return float(distributed.all_sum(part.reshape(1), "reconstruction", what))


def corrected_prune_counts(
    rates: list[torch.Tensor], cols: list[int], target_zeros: int
) -> tuple[list[torch.Tensor], float]:
    """Per-row prune counts ``floor(clamp(rate_r + t, 0, 1) * C)`` with one common offset ``t``
    chosen by bisection so that the total is the smallest count >= ``target_zeros`` (exact up to
    the rows that share a rate). Returns the counts and ``t``."""

    def counts(t: float) -> list[torch.Tensor]:
        return [
            torch.floor((r.double() + t).clamp(0.0, 1.0) * c).to(torch.int64)
            for r, c in zip(rates, cols, strict=True)
        ]

    def total(t: float) -> int:
        return int(sum(int(x.sum()) for x in counts(t)))

    lo, hi = -1.0, 1.0
    if total(0.0) == target_zeros:
        return counts(0.0), 0.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if total(mid) >= target_zeros:
            hi = mid
        else:
            lo = mid
    # hi: smallest offset reaching the target; lo: largest below it; take the closer total
    t = hi if abs(total(hi) - target_zeros) <= abs(total(lo) - target_zeros) else lo
    return counts(t), t


@dataclass
class ParamGroup:
    """One parameter group of the block loop: float32 leaf tensors and their learning rate at
    the reference step count (``cfg.step_lr`` turns it into the rate per step)."""

    name: str  #: report key prefix: ``"lr"`` (sparsity logits) or ``"clip_lr"`` (clipping)
    params: list[torch.Tensor]
    lr: float


@dataclass
class LoopResult:
    """What :func:`optimise_block` did: per-step curves and the loss scaler's end state."""

    losses: list[float] = field(default_factory=list)
    recs: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)  # e.g. the block's expected sparsity
    skipped_at: list[int] = field(default_factory=list)
    lr_per_step: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    scaler: LossScaler | None = None

    def report(self) -> dict[str, Any]:
        sc = self.scaler
        assert sc is not None
        return {
            "loss": self.losses,
            "reconstruction": self.recs,
            "steps": len(self.losses),
            **{f"{k}_per_step": v for k, v in self.lr_per_step.items()},
            "optimisation_seconds": self.seconds,
            "loss_scaling": sc.enabled,
            "loss_scale": sc.scale if sc.enabled else None,
            "skipped_steps": sc.skipped,
            "skipped_at": self.skipped_at,
        }


def optimise_block(
    ctx: BlockContext,
    targets: list[torch.Tensor],
    groups: list[ParamGroup],
    weights_for_step: Callable[[], dict[str, torch.Tensor]],
    penalty: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    what: str = "BESA",
    linear_weights: dict[str, Callable[[], torch.Tensor]] | None = None,
    linear_forwards: dict[str, LinearForward] | None = None,
) -> LoopResult:
    """The block-wise optimisation loop shared by every learned method (BESA, BESA joint with
    quantization, learned clipping alone): ``cfg.epochs`` passes over the calibration samples in
    batches of ``cfg.batch_size``; each step runs the block with the weights returned by
    ``weights_for_step()`` (``{"<linear>.weight": tensor}``, differentiable in the groups'
    parameters) on the pruned-chain inputs, and minimises the relative reconstruction error
    against ``targets`` plus ``penalty()[0]`` (``penalty()[1]`` is logged, e.g. the block's
    expected sparsity).

    Every group's rate per step is ``cfg.step_lr(steps, group.lr)`` (the step budget applies to
    all groups alike). With loss scaling (float16 by default) the loss is scaled before the
    backward pass, all groups' gradients are unscaled and checked together, and a step with a
    non-finite gradient is skipped; the scale starts from the previous block's. The block's own
    parameters are frozen while the loop runs.

    ``linear_weights``: weights made inside the linear layers' own forward instead (``{layer
    name: maker}``, :func:`recomputed_linears`), so that they are not all held at once;
    ``linear_forwards``: the linear layers' forwards replaced (``{layer name: forward}``,
    :func:`patched_linears`; the weights they use are not in ``weights_for_step()``).

    Inside a process group each rank runs its part of every global batch and the gradients are
    summed over the ranks before the step (:class:`besa_rs.pruning.distributed.LoopSync`)."""
    cfg = ctx.cfg
    dev = ctx.device
    slices = distributed.steps_of(ctx, len(ctx.xs), cfg.batch_size)
    sync = distributed.LoopSync.create(ctx, targets, slices)  # None in a single process
    steps_total = cfg.epochs * len(slices)
    res = LoopResult()
    res.lr_per_step = {g.name: cfg.step_lr(steps_total, g.lr) for g in groups}
    params = [p for g in groups for p in g.params]
    opt = make_optimizer(
        [{"params": g.params, "lr": res.lr_per_step[g.name]} for g in groups],
        cfg,
        res.lr_per_step[groups[0].name],
    )
    scaler = LossScaler(
        enabled=cfg.uses_loss_scaling(ctx.compute_dtype),
        scale=float(cfg.loss_scale_init),
        growth_interval=cfg.loss_scale_growth_interval,
    )
    prev_scale = (ctx.previous or {}).get("loss_scale")
    if scaler.enabled and prev_scale:
        scaler.scale = float(prev_scale)  # the previous block's scale: no re-learning it
    res.scaler = scaler
    requires = {p: p.requires_grad for p in ctx.block.parameters()}
    for p in ctx.block.parameters():
        p.requires_grad_(False)
    t_opt = time.perf_counter()
    patched = contextlib.ExitStack()
    try:
        patched.enter_context(recomputed_linears(ctx.linears, linear_weights, dev))
        patched.enter_context(patched_linears(ctx.linears, linear_forwards))
        step = 0
        for _epoch in range(cfg.epochs):
            for k, sl in enumerate(slices):
                weights = weights_for_step()
                x = y = out = y_hat = None
                if sl.stop > sl.start:  # a rank's part of a short last batch may be empty
                    x = ctx.batch(ctx.xs, sl)
                    y = torch.cat(targets[sl], dim=0).to(dev)
                    with ctx.autocast():
                        out = functional_call(ctx.block, weights, (x, *ctx.args), ctx.kwargs)
                    y_hat = out[0] if isinstance(out, (tuple, list)) else out
                    rec = (
                        relative_reconstruction(y, y_hat)
                        if sync is None
                        else relative_reconstruction(y, y_hat, sync.norms[k])  # global norms
                    )
                else:
                    rec = torch.zeros((), device=dev)
                loss = rec
                logged = None
                if penalty is not None:
                    term, logged = penalty()
                    # the penalty is counted once: rank 0's (the ranks' losses are summed)
                    loss = rec + (term if sync is None or sync.main else 0.0 * term)
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    scaler.backward(loss)
                lv = float(loss.detach())
                rec_v = float(rec.detach())
                if sync is not None:  # gradients and loss of the global batch, on every rank
                    rec_v = sync.reduce(params, rec)
                    lv = rec_v + (float(term.detach()) if penalty is not None else 0.0)
                if not math.isfinite(lv):
                    raise NumericalError(
                        f"block {ctx.index}: the {what} loss became {lv} at step {step} "
                        f"(reconstruction {rec_v}); try a smaller learning rate or float32"
                    )
                finite = scaler.unscale_and_check(params)
                if finite:
                    opt.step()
                elif not scaler.enabled:
                    raise NumericalError(
                        f"block {ctx.index}: non-finite gradients at step {step} with a finite "
                        f"loss {lv:.4g}; try float32 or loss_scaling='dynamic'"
                    )
                else:
                    res.skipped_at.append(step)
                    if scaler.scale * 0.5 < MIN_LOSS_SCALE:
                        raise NumericalError(
                            f"block {ctx.index}: gradients stay non-finite at step {step} even "
                            f"with loss scale {scaler.scale:.3g}; try bfloat16 or float32"
                        )
                scaler.update(finite)
                res.losses.append(lv)
                res.recs.append(rec_v)
                if logged is not None:
                    res.penalties.append(float(logged.detach()))
                step += 1
                if ctx.progress is not None:
                    ctx.progress.update(1)
                    post = {"loss": f"{lv:.4g}"}
                    if logged is not None:
                        post["s"] = f"{float(logged.detach()):.3f}"
                    ctx.progress.set_postfix(post, refresh=False)
                del weights, out, y_hat, loss, rec, x, y
                if linear_weights is not None or linear_forwards is not None:
                    heap.release()  # a large block: its step's freed heap pages
    finally:
        patched.close()
        for p, r in requires.items():
            p.requires_grad_(r)
    res.seconds = time.perf_counter() - t_opt
    del opt
    return res


class _LazyMap(Mapping[str, torch.Tensor]):
    """A read-only mapping whose values are made by ``make(key)`` when looked up (not kept)."""

    def __init__(self, keys: list[str], make: Callable[[str], torch.Tensor]) -> None:
        self._keys = keys
        self._make = make

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._make(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _kept_fraction(keep: torch.Tensor) -> float:
    """Fraction of True in a boolean mask (counted: no full-size copy of the mask)."""
    return int(torch.count_nonzero(keep)) / keep.numel()


def _row_kept_fractions(keep: torch.Tensor) -> torch.Tensor:
    """Fraction of True in each row (float64 ``[R]``), a chunk of rows at a time: torch's
    reductions of a boolean tensor along a dimension copy it whole into a wider dtype."""
    rows, cols = keep.shape
    out = torch.empty(rows, dtype=torch.float64, device=keep.device)
    step = ste_codes.chunk_rows(cols)
    for a in range(0, rows, step):
        out[a : a + step] = torch.count_nonzero(keep[a : a + step], dim=1).double() / cols
    return out


def prune_block_besa(ctx: BlockContext) -> dict[str, Any]:
    lean = recompute_masked_weights(sum(lin.weight.numel() for lin in ctx.linears.values()))
    # large blocks: large temporaries mapped and unmapped, not kept in the heap (heap.py)
    # not when pruning jointly with quantization: its fake-quantized chunks make many more
    # temporaries, and mapping each took a LLaMA-7B-shaped block from 66 to 202 s for 0.09 GB
    tight = lean and not ctx.cfg.joint
    with heap.tightened() if tight else contextlib.nullcontext():
        return _prune_block_besa(ctx, lean)


def _prune_block_besa(ctx: BlockContext, lean: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    kind, k = cfg.granularity_rows()
    dev = ctx.device
    names = list(ctx.linears)
    need_norms = cfg.metric == "wanda"
    need_h = cfg.metric == "sparsegpt" or cfg.reconstruct

    # a block large enough for the lean memory path also hands freed heap pages back to the
    # system after each stage (heap.py): the stage's temporaries are not kept resident
    release = heap.release if lean else (lambda: False)

    # --- 1-3: dense target and importance statistics on the pruned-chain inputs
    if cfg.prune_dense and ctx.xd is not None:
        stats, _ = ctx.run_with_stats(ctx.xs, need_norms, need_h, keep_outputs=False)
        targets = ctx.run_all(ctx.xd)
        ctx.next_xd = targets
    else:
        stats, targets = ctx.run_with_stats(ctx.xs, need_norms, need_h, keep_outputs=True)
    release()

    # --- 4-6: ranks, candidates, logits
    cand = ste.candidate_sparsities(cfg.candidate_step).to(dev)
    D = cand.shape[0]
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, torch.Tensor] = {}
    buckets: dict[str, ste_codes.BucketCodes] = {}  # in place of ranks on the CPU's lean path
    logits: dict[str, torch.Tensor] = {}
    rows_per_group: dict[str, int] = {}
    compact = use_codes(lean, dev, D)
    for name in names:
        W = ctx.linears[name].weight.detach()
        full = f"block {ctx.index} {name}"
        rows_of = importance_rows(cfg.metric, W, stats.get(name), cfg.percdamp, full, dev)
        if compact:  # one byte per weight; the importance resolves each mask's boundary
            buckets[name] = ste_codes.BucketCodes.build(rows_of, W.shape, dev, cand)
        else:  # int16 ranks below 32768 columns, sorted a row chunk at a time (the same ranks)
            ranks[name] = ste.row_ranks_by_chunks(rows_of, W.shape, dev, ste.rank_dtype(W.shape[1]))
        release()  # the sort's chunk temporaries
        G = groups_for(kind, k, W.shape[0], full)
        rows_per_group[name] = W.shape[0] // G
        weights[name] = W
        logits[name] = torch.zeros(G, D, dtype=torch.float32, device=dev, requires_grad=True)
    params_per_group = {n: rows_per_group[n] * weights[n].shape[1] for n in names}
    total_params = sum(weights[n].numel() for n in names)
    target = float(cfg.sparsity)

    #: this step's expected sparsities from the chunked layers' forwards (one softmax per layer
    #: and step for the mask and the penalty; taken by the penalty)
    step_alpha: dict[str, torch.Tensor] = {}

    def block_sparsity() -> torch.Tensor:
        s = torch.zeros((), dtype=torch.float32, device=dev)
        for n in names:
            a = step_alpha.pop(n, None)
            if a is None:
                a = ste.expected_sparsity(logits[n], cand, cfg.smoothing)
            s = s + a.sum() * params_per_group[n]
        return s / total_params

    # learned clipping (None without wbits); a searched init starts from the first step's mask
    def hard_keep(n: str, n_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``n``'s hard keep-mask: of its logits' prune counts, or of ``n_rows``."""
        if n_rows is None and n in buckets:  # the counts ste.hard_mask takes for ranks
            a = ste.expected_sparsity(logits[n].detach(), cand, cfg.smoothing)
            n_rows = ste.prune_counts(a, weights[n].shape[1]).repeat_interleave(rows_per_group[n])
        if n_rows is None:
            return ste.hard_mask(ranks[n], logits[n].detach(), cand, cfg.smoothing)
        if n in buckets:
            return buckets[n].keep(n_rows)
        r = ranks[n]  # counts in the ranks' dtype (they are <= cols): no int64 copy of the ranks
        return r >= n_rows.to(dev, r.dtype).unsqueeze(1)

    init: Mapping[str, torch.Tensor] = weights
    if cfg.wbits is not None and cfg.clip_init_mode == "search":
        # each layer's masked weight made when the search reaches it (not all at once)
        init = _LazyMap(names, lambda n: weights[n] * hard_keep(n))
    norms = {n: stats[n].sq_norm if need_norms else None for n in names}
    clip = quant.BlockClip.create(cfg, init, dev, ctx.index, norms)
    del init

    def masked_weight(n: str) -> torch.Tensor:
        m = ste.ste_mask(weights[n], ranks[n], logits[n], cand, cfg.smoothing)
        if clip is not None:  # joint: the forward uses quantize(W * M), STE rounding
            m = clip.fake_quant({f"{n}.weight": m})[f"{n}.weight"]
        return m

    def chunked_forward(n: str, x: torch.Tensor) -> torch.Tensor:
        """Layer ``n`` on ``x`` with its masked (and fake-quantized) weight made a chunk of rows
        at a time (bucket codes: :class:`besa_rs.ste.codes.RowChunkedLinear`)."""
        W = weights[n]
        w_rows, n_rows, step_alpha[n] = ste_codes.step_plan(
            logits[n], cand, cfg.smoothing, *W.shape
        )
        params = [w_rows]
        fq = None
        if clip is not None:
            spec = clip.spec
            params.append(clip.logits[n])

            def fq(m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                return quant.fake_quant(m, c, spec)

        layer = ste_codes.MaskedLayer(W, buckets[n], n_rows, fq)
        return ste_codes.layer_forward(x, ctx.linears[n].bias, layer, params, heap.release)

    def masked_weights() -> dict[str, torch.Tensor]:
        if lean or compact:
            return {}  # made inside each layer's forward (linear_weights / forwards below)
        return {f"{n}.weight": masked_weight(n) for n in names}

    lazy: dict[str, Callable[[], torch.Tensor]] | None = None
    forwards: dict[str, LinearForward] | None = None
    if compact:
        forwards = {n: functools.partial(chunked_forward, n) for n in names}
    elif lean:
        lazy = {n: functools.partial(masked_weight, n) for n in names}

    def sparsity_penalty() -> tuple[torch.Tensor, torch.Tensor]:
        s = block_sparsity()
        return cfg.lam * ((s - target) / target) ** 2, s

    # --- 7-10: optimisation (the loop shared with learned clipping alone)
    groups = [ParamGroup("lr", [logits[n] for n in names], cfg.learning_rate)]
    if clip is not None:
        groups.append(clip.param_group(cfg))
    loop = optimise_block(
        ctx,
        targets,
        groups,
        masked_weights,
        sparsity_penalty,
        linear_weights=lazy,
        linear_forwards=forwards,
    )
    first = slice(0, cfg.batch_size)
    first_target = torch.cat(targets[first], dim=0)
    del targets

    # --- 11: hard masks with exact block sparsity, weights updated in place
    with torch.no_grad():
        alphas = {n: ste.expected_sparsity(logits[n].detach(), cand, cfg.smoothing) for n in names}
        # kept fraction of the learned hard masks: in the loop below, one layer's mask at a time
        # and only once the ranks of the layers before it are freed
        hard_kept: dict[str, float] = {}
        rates = [alphas[n].repeat_interleave(rows_per_group[n]) for n in names]
        cols = [weights[n].shape[1] for n in names]
        target_zeros = round(target * total_params)
        counts, shift = corrected_prune_counts(rates, cols, target_zeros)
        layers = []
        for n, cnt in zip(names, counts, strict=True):
            lin: nn.Linear = ctx.linears[n]
            hard_kept[n] = _kept_fraction(hard_keep(n))
            keep = hard_keep(n, cnt)
            # the ranks (or codes) are not needed after this
            ranks.pop(n, None)
            buckets.pop(n, None)
            W = lin.weight
            dead: dict[str, Any] = {}
            if cfg.reconstruct:
                keep, dead = refit_layer(W, keep, stats[n].hessian, cfg, f"block {ctx.index} {n}")
            else:
                W.mul_(keep.to(W.dtype))
            qinfo: dict[str, Any] = {}
            if clip is not None:  # learned clipping; with reconstruct the GPTQ pass (quant.py)
                H = stats[n].hessian if cfg.reconstruct else None
                qinfo = clip.finish(n, lin, keep, H, cfg, ctx.index)
            a = alphas[n]
            row_rates = 1.0 - _row_kept_fractions(keep)
            layers.append(
                {
                    "name": n,
                    "shape": list(W.shape),
                    "params": W.numel(),
                    "groups": int(a.shape[0]),
                    "target_sparsity": target,
                    "learned_sparsity": float(a.mean()),  # expected alpha (equal-size groups)
                    "hard_sparsity_learned": 1.0 - hard_kept[n],
                    "realised_sparsity": 1.0 - _kept_fraction(keep),
                    "row_sparsity_min": float(row_rates.min()),
                    "row_sparsity_max": float(row_rates.max()),
                    "row_sparsity_std": float(row_rates.std()) if row_rates.numel() > 1 else 0.0,
                    **dead,
                    **qinfo,
                }
            )
            del keep, row_rates
            release()
        expected = sum(float(alphas[n].sum()) * params_per_group[n] for n in names) / total_params
        hard = sum((1.0 - hard_kept[n]) * weights[n].numel() for n in names) / total_params
        # the first calibration sample once more, through the finished block: with the first
        # step's reconstruction error it shows whether the optimisation improved the block
        rec_after = first_batch_reconstruction(ctx, first_target)
    del stats
    return {
        "layers": layers,
        "expected_sparsity": expected,
        "hard_sparsity_learned": hard,
        "sparsity_shift": shift,
        **loop.report(),
        "sparsity_curve": loop.penalties,
        "first_sample_reconstruction": [loop.recs[0] if loop.recs else float("nan"), rec_after],
    }


register(Method("besa", prune_block_besa, learned=True, dense_chain=True))

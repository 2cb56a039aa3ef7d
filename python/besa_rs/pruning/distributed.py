"""Data-parallel pruning on torch.distributed (docs/pruning.md, "Several GPUs or machines").

Inside an initialised process group of ``N > 1`` ranks (``torchrun``, or a caller's own
``init_process_group``), every rank runs the same sequential block loop on its own shard of the
calibration samples; nothing else about the run changes:

- **The split.** The calibration samples are cut into the optimisation loop's global batches
  (``batch_size`` sequences, the last one possibly shorter; the baselines take all samples as
  one batch). Each global batch is split into ``N`` contiguous chunks whose sizes differ by at
  most one, the first ``len % N`` ranks taking one more sample. A rank holds only its chunks'
  activations, so cache memory per rank falls by ``N``. A chunk may be empty (a last batch
  shorter than ``N``): that rank then contributes zero to that step.
- **Statistics** (Wanda's squared column norms, the Hessians of SparseGPT, ``--reconstruct``
  and GPTQ) are summed over ranks, the Hessians weighted by each rank's token count, so every
  rank holds the statistics of all samples.
- **The learned loop** (BESA's sparsity logits, the learned clipping of quantization): the
  per-channel norms of the reconstruction loss are those of the global batch (summed over
  ranks once per block, before the loop), so the per-rank losses add up to the global batch's
  loss; the parameters' gradients (plus the loss value) are summed in one all-reduce per step.
  Every rank thus takes the single-process step on the same global batch, and the float16 loss
  scaler decides on the summed gradients: overflow anywhere is overflow everywhere.
- **Consistency.** Before any work the ranks compare a hash of their settings, calibration
  tokens and model (rank 0's is the reference); after each block rank 0's pruned weights are
  broadcast, so the chain cannot drift. Rank 0 writes the outputs and the checkpoint's
  block files and ``state.json``; each rank writes its own activation shard next to them.
- **Streamed loading** (:mod:`besa_rs.pruning.streaming`, the default where it is safe, as in
  one process): every rank builds the meta skeleton and reads each block from the
  memory-mapped safetensors shards when its turn comes; rank 0 alone lays out and fills the
  output files, the other ranks free each block once it is pruned. Host memory per rank is then
  one block plus the embeddings plus that rank's share of the activation caches.

Backends: gloo on CPU, nccl with one GPU per local rank (``LOCAL_RANK``). Every collective has
the process group's timeout (``BESA_RS_DIST_TIMEOUT`` seconds, default 1800): a rank that dies
or stops answering makes the others fail with a :class:`~besa_rs.errors.DistributedError`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .. import _native
from ..errors import BesaError, ConfigError, DistributedError, first_line

if TYPE_CHECKING:
    from .config import PruneConfig
    from .stats import LinearStats

T = TypeVar("T")

TIMEOUT_ENV = "BESA_RS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


# ---------------------------------------------------------------------------------------------
# the process group


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return t


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str) -> str:
    """For the CLI under ``torchrun``: initialises the default process group from the
    launcher's environment (gloo for a CPU ``device``, nccl for CUDA) with the timeout of
    :func:`timeout_s`, and returns the device this rank computes on (``cuda:LOCAL_RANK`` for a
    CUDA ``device``). Outside a launcher it returns ``device`` unchanged."""
    if not launched() or dist.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    try:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s()),
            device_id=torch.device(device) if cuda else None,
        )
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"could not join the process group ({first_line(e)}); start with torchrun"
        ) from None
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Runs one collective; a failure (a rank died, the timeout) becomes a one-line error."""
    try:
        return fn()
    except BesaError:
        raise
    except (RuntimeError, ValueError, OSError) as e:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: lost the other ranks during {what} "
            f"({first_line(e)}); another rank failed or stopped: see its error"
        ) from None


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(what: str) -> None:
    if active():
        _collective(what, lambda: dist.barrier())


def on_main(what: str, fn: Callable[[], T]) -> T:
    """Runs ``fn`` on rank 0 only (e.g. checks that create or delete files) and hands its
    result, or its :class:`BesaError`, to every rank: all ranks return or raise together."""
    if not active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BesaError as e:
            box[0] = ("error", e)
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    status, value = box[0]
    if status == "error":
        raise value
    return value  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# communication volume


@dataclass
class Traffic:
    """Bytes of the tensors handed to collectives (each rank's payload; a ring all-reduce
    moves about ``2 (N-1)/N`` times this over each rank's link)."""

    by_kind: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    def add(self, kind: str, t: torch.Tensor) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + t.numel() * t.element_size()
        self.calls += 1

    def take(self) -> dict[str, Any]:
        out = {"bytes": dict(self.by_kind), "total_bytes": sum(self.by_kind.values())}
        out["collectives"] = self.calls
        self.by_kind = {}
        self.calls = 0
        return out


TRAFFIC = Traffic()


def _all_reduce(kind: str, t: torch.Tensor, what: str) -> torch.Tensor:
    TRAFFIC.add(kind, t)
    _collective(what, lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return t


# ---------------------------------------------------------------------------------------------
# the split of the calibration samples


def chunk(lo: int, hi: int, n: int, r: int) -> tuple[int, int]:
    """Rank ``r``'s contiguous part of ``[lo, hi)`` split in ``n`` parts whose sizes differ by
    at most one (the first ``(hi - lo) % n`` parts are the longer ones)."""
    q, extra = divmod(hi - lo, n)
    start = lo + r * q + min(r, extra)
    return start, start + q + (1 if r < extra else 0)


@dataclass
class Shard:
    """Which calibration samples this rank holds, and its part of each optimisation step."""

    world: int
    rank: int
    nsamples: int
    batch: int  # global batch of the optimisation loop (all samples for the baselines)
    indices: list[int]  # the global sample indices this rank holds, in its local order
    steps: list[slice]  # per optimisation step: this rank's slice of its local samples
    step_sizes: list[int]  # per step: the global batch's size

    @classmethod
    def plan(cls, nsamples: int, batch: int, world: int, r: int) -> Shard:
        indices: list[int] = []
        steps: list[slice] = []
        sizes: list[int] = []
        for lo in range(0, nsamples, batch):
            hi = min(lo + batch, nsamples)
            a, b = chunk(lo, hi, world, r)
            steps.append(slice(len(indices), len(indices) + b - a))
            indices.extend(range(a, b))
            sizes.append(hi - lo)
        return cls(world, r, nsamples, batch, indices, steps, sizes)

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world,
            "backend": dist.get_backend() if active() else None,
            "global_batch": self.batch,
            "samples_per_rank": [len(Shard.plan(self.nsamples, self.batch, self.world, r).indices)
                                 for r in range(self.world)],
        }  # fmt: skip


def loop_batch(cfg: PruneConfig, nsamples: int) -> int:
    """The global batch the samples are split by: the learned loop's ``batch_size``, or all
    samples (the baselines only gather statistics)."""
    from .registry import method_for

    learned = method_for(cfg).learned
    return min(cfg.batch_size, nsamples) if learned else nsamples


def check_world(cfg: PruneConfig, nsamples: int, world: int) -> None:
    """Settings that cannot be split over ``world`` ranks: one-line errors."""
    if world <= 1:
        return
    if world > nsamples:
        raise ConfigError(
            f"world size {world} is larger than the {nsamples} calibration samples: every rank "
            "needs at least one (use more --nsamples or fewer ranks)"
        )
    from .registry import method_for

    if method_for(cfg).learned and cfg.batch_size < world:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is smaller than the world size {world}: each "
            f"optimisation step's batch is split over the ranks; use --batch-size {world} or a "
            f"multiple of it"
        )


def steps_of(ctx: Any, nsamples: int, batch: int) -> list[slice]:
    """The optimisation loop's slices of ``ctx.xs``, one per step: the plain batches, or this
    rank's parts of the global batches."""
    shard: Shard | None = getattr(ctx, "shard", None)
    if shard is None:
        return [slice(s, s + batch) for s in range(0, nsamples, batch)]
    return shard.steps


# ---------------------------------------------------------------------------------------------
# set-up of a run


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: nn.Module) -> dict[str, Any]:
    """A cheap identity of the model: its config, its parameters' names, shapes and dtypes, and
    a strided sample of the values of every parameter in memory (a streamed skeleton's blocks
    are on ``meta``: their values are identified by :meth:`SourceFiles.identity
    <besa_rs.pruning.streaming.SourceFiles.identity>`)."""
    cfg = getattr(model, "config", None)
    ident: dict[str, Any] = {"config": cfg.to_dict() if cfg is not None else None, "params": []}
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            ident["params"].append([name, list(p.shape), str(p.dtype)])
            if p.device.type == "meta":
                continue
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    ident["sample"] = h.hexdigest()
    ident["config"] = {k: v for k, v in (ident["config"] or {}).items() if k != "_name_or_path"}
    return ident


def check_same_everywhere(identity: dict[str, Any]) -> None:
    """Every rank hashes ``identity`` (settings, calibration tokens, model); all hashes are
    gathered and compared with rank 0's. A mismatch is refused on every rank."""
    digest = bytes.fromhex(_digest(identity))
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=_comm_device())
    allh = [torch.empty_like(mine) for _ in range(world_size())]
    TRAFFIC.add("consistency", mine)
    _collective("the settings check", lambda: dist.all_gather(allh, mine))
    ref = allh[0]
    bad = [r for r, h in enumerate(allh) if not torch.equal(h, ref)]
    if bad:
        raise ConfigError(
            f"rank(s) {', '.join(map(str, bad))} run with settings, calibration tokens, a model "
            "or a --load mode different from rank 0's: every rank must run the same command on "
            "the same files"
        )


def setup(
    cfg: PruneConfig, tokens: torch.Tensor, model: nn.Module, stream: Any = None
) -> Shard | None:
    """Called once by the sequential driver: ``None`` outside a process group (or with one
    rank); else this rank's :class:`Shard` after the checks of :func:`check_world` and
    :func:`check_same_everywhere`. ``stream``: the run's
    :class:`~besa_rs.pruning.streaming.StreamedModel`, when it streams (every rank must: the
    load mode and the checkpoint files' contents are part of the check)."""
    if not active():
        return None
    n = int(tokens.shape[0])
    world = world_size()
    check_world(cfg, n, world)
    from .checkpoint import tokens_digest

    settings = cfg.fingerprint()
    check_same_everywhere(
        {
            "settings": settings,
            "tokens": tokens_digest(tokens),
            "model": model_identity(model),
            "load": "in-memory" if stream is None else "streamed",
            "source": None if stream is None else stream.source.identity(),
            "world": world,
        }
    )
    TRAFFIC.take()  # the blocks' traffic starts here
    return Shard.plan(n, loop_batch(cfg, n), world, rank())


# ---------------------------------------------------------------------------------------------
# the collectives of the block loop


def reduce_stats(stats: dict[str, LinearStats]) -> None:
    """Sums every layer's input statistics over the ranks (in place): squared column norms add
    up; each Hessian ``2/n_r sum x x^T`` is weighted by its rank's token count ``n_r`` before
    the sum and divided by the total after it."""
    if not active():
        return
    for name, st in stats.items():
        what = f"the statistics of {name}"
        n = torch.tensor([float(st.ntokens)], dtype=torch.float64, device=_comm_device())
        total = int(_all_reduce("statistics", n, what).item())
        if st.sq_norm is not None:
            st.sq_norm.copy_(_all_reduce("statistics", _on_comm(st.sq_norm), what))
        if st.hessian is not None:
            h = _on_comm(st.hessian).mul_(float(st.ntokens))
            _all_reduce("statistics", h, what)
            st.hessian.copy_(h.div_(max(total, 1)))
        st.ntokens = total


def _on_comm(t: torch.Tensor) -> torch.Tensor:
    dev = _comm_device()
    return t.clone() if t.device == dev else t.to(dev)


class LoopSync:
    """The learned loop's collectives for one block: global-batch norms of the loss (one
    all-reduce before the loop), and per step the summed gradients and loss (one all-reduce)."""

    def __init__(self, norms: list[torch.Tensor | None], index: int):
        self.norms = norms
        self.index = index

    @classmethod
    def create(cls, ctx: Any, targets: list[torch.Tensor], steps: list[slice]) -> LoopSync | None:
        """``None`` outside a process group: the loop computes the batch's norms itself."""
        if not active():
            return None
        # every rank holds a part of the first (full) batch: check_world
        width = int(targets[0].shape[-1])
        sq = torch.zeros(len(steps), width, dtype=torch.float32, device=ctx.device)
        for k, sl in enumerate(steps):
            if sl.stop > sl.start:
                y = torch.cat(targets[sl], dim=0).to(ctx.device).float()
                sq[k] = (y.reshape(-1, y.shape[-1]) ** 2).sum(0)
        sq = _all_reduce("loss norms", _on_comm(sq), f"block {ctx.index}'s loss norms")
        n2 = sq.to(ctx.device).clamp_min(1e-12)
        return cls([n2[k] for k in range(len(steps))], ctx.index)

    @property
    def main(self) -> bool:
        return is_main()

    def reduce(self, params: list[torch.Tensor], rec: torch.Tensor) -> float:
        """Sums the parameters' gradients (missing ones count as zero) and this rank's part of
        the reconstruction loss over the ranks, in one all-reduce; returns the global loss."""
        parts = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in params
        ]
        parts.append(rec.detach().reshape(1).float().to(parts[0].device if parts else "cpu"))
        flat = torch.cat(parts).to(_comm_device())  # a fresh tensor: no copy when on the CPU
        # tests: BESA_RS_TEST_CRASH_AT=distributed-blockI-rankR kills rank R here (SIGKILL)
        _native.crash_point(f"distributed-block{self.index}-rank{rank()}")
        _all_reduce("gradients", flat, f"block {self.index}'s optimisation step")
        off = 0
        for p in params:
            k = p.numel()
            g = flat[off : off + k].view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += k
        return float(flat[off])


def all_sum(t: torch.Tensor, kind: str, what: str) -> torch.Tensor:
    """``t`` summed over the ranks (a new tensor on ``t``'s device; ``t`` itself outside a
    process group). ``kind``: its traffic category."""
    if not active():
        return t
    return _all_reduce(kind, _on_comm(t), what).to(t.device)


def sync_block(linears: dict[str, nn.Linear], index: int) -> None:
    """Rank 0's pruned weights for every rank, so the pruned chain is the same everywhere."""
    if not active():
        return
    for name, lin in linears.items():
        w = _on_comm(lin.weight.data)
        TRAFFIC.add("weights", w)

        def bcast(w: torch.Tensor = w) -> None:
            dist.broadcast(w, src=0)

        _collective(f"block {index}'s weight broadcast ({name})", bcast)
        with torch.no_grad():
            lin.weight.copy_(w)


def checkpoint_inputs_name(nxt: int) -> str:
    """This rank's activation shard in a checkpoint directory."""
    if not active():
        return f"inputs_{nxt:03d}.pt"
    return f"inputs_{nxt:03d}.rank{rank():03d}.pt"

"""Resumable progress of a pruning run.

After every block the checkpoint directory receives, each file written atomically (temporary
file, fsync, rename), in this order:

1. ``block_NNN.safetensors``: the finished block's pruned linear weights (exact values);
2. ``inputs_NNN.pt``: the next block's calibration inputs (pruned chain, and dense chain with
   ``prune_dense``);
3. ``state.json``: the next block index, the per-block reports so far, the RNG state and a
   fingerprint of the settings, the model and the calibration tokens.

``state.json`` is written last and names the next block, so a run killed at any moment
(``kill -9``) resumes from the last block whose three files are complete; older ``inputs``
files are deleted only after the new state is in place.

A streamed run (:mod:`besa_rs.pruning.streaming`) writes no block files: its finished blocks
are in the output files being filled in this directory, written and fsynced before step 2.

Inside a torch.distributed process group (:mod:`besa_rs.pruning.distributed`) rank 0 writes
the block files (streamed: fills the output files) and ``state.json`` (which records the world
size); each rank writes its own activation shard ``inputs_NNN.rankRRR.pt`` (the directory must
be shared by all nodes), and ``state.json`` is written only after every shard is in place. A
checkpoint resumes with the same number of ranks only: the shards hold each rank's samples.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import _native
from .._io import atomic_path, write_json_atomic
from ..errors import ConfigError, FormatError
from . import distributed, quant
from .adapters import ModelAdapter
from .config import PruneConfig, spec_of
from .sequential import RunState

STATE = "state.json"
VERSION = 1


def tokens_digest(tokens: torch.Tensor) -> str:
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


class Checkpointer:
    """Saves and restores :class:`RunState` in ``directory``. With ``resume`` False any previous
    progress there is ignored (and overwritten)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        cfg: PruneConfig,
        tokens: torch.Tensor,
        resume: bool,
        streamed: bool = False,
    ):
        self.dir = Path(directory)
        self.resume = resume
        # streamed runs keep finished blocks in the output files being filled in this directory
        # (besa_rs.pruning.streaming), not in block files
        self.streamed = streamed
        self.fingerprint: dict[str, Any] = {
            "version": VERSION,
            "settings": cfg.fingerprint(),
            "tokens": tokens_digest(tokens),
        }
        if streamed:
            self.fingerprint["load"] = "streamed"
        self.resumed_from: int | None = None
        self.quant_spec = spec_of(cfg)

    # ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.dir / STATE).is_file()

    def load(self, adapter: ModelAdapter) -> RunState | None:
        if not self.resume or not self.exists():
            return None
        try:
            state = json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{self.dir / STATE}: unreadable checkpoint state ({e})") from None
        fp = dict(self.fingerprint, model_type=adapter.model_type, num_blocks=len(adapter))
        if state.get("fingerprint") != fp:
            raise ConfigError(
                f"{self.dir}: the checkpoint was made with different settings, model or calibration "
                "tokens; resume with the same ones or start over with --overwrite"
            )
        made_by = int(state.get("world_size", 1))
        if made_by != distributed.world_size():
            raise ConfigError(
                f"{self.dir}: the checkpoint was made by {made_by} rank(s) and this run has "
                f"{distributed.world_size()}: resume with the same number "
                f"(torchrun --nproc-per-node {made_by}) or start over with --overwrite"
            )
        nxt = int(state["next_block"])
        for info in [] if self.streamed else state["blocks"]:
            i = int(info["index"])
            path = self.dir / f"block_{i:03d}.safetensors"
            if not path.is_file():
                raise FormatError(f"{path}: missing from the checkpoint")
            tensors = load_file(str(path))
            lins = adapter.linears(i)
            for name, lin in lins.items():
                if name not in tensors:
                    raise FormatError(f"{path}: tensor {name!r} missing")
                with torch.no_grad():
                    lin.weight.copy_(tensors[name].to(lin.weight.dtype))
            quant.restore_block(lins, tensors, self.quant_spec)
        ipath = self.dir / distributed.checkpoint_inputs_name(nxt)
        if ipath.is_file():
            inputs = torch.load(ipath, weights_only=True)
        elif nxt >= int(state.get("last_block", nxt)):
            inputs = {"xs": []}  # every block is done; only the outputs were missing
        else:
            raise FormatError(f"{ipath}: missing from the checkpoint")
        rng = base64.b64decode(state["rng"])
        torch.set_rng_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))
        self.resumed_from = nxt
        return RunState(
            next_block=nxt, xs=inputs["xs"], xd=inputs.get("xd"), blocks=state["blocks"]
        )

    def save(self, adapter: ModelAdapter, state: RunState, last: int) -> None:
        i = state.next_block - 1
        main = distributed.is_main()
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
        if main and not self.streamed:
            weights = {
                name: lin.weight.detach().to("cpu").contiguous()
                for name, lin in adapter.linears(i).items()
            }
            weights.update(quant.block_tensors(adapter.linears(i)))  # codes, scales, zero points
            with atomic_path(self.dir / f"block_{i:03d}.safetensors") as tmp:
                save_file(weights, str(tmp))
        if main:
            _native.crash_point("checkpoint-after-block-file")
        distributed.barrier(f"block {i}'s checkpoint")  # the directory exists for every rank
        nxt = state.next_block
        inputs = distributed.checkpoint_inputs_name(nxt)
        if nxt < last:
            with atomic_path(self.dir / inputs) as tmp:
                payload: dict[str, Any] = {"xs": [x.to("cpu") for x in state.xs]}
                if state.xd is not None:
                    payload["xd"] = [x.to("cpu") for x in state.xd]
                torch.save(payload, tmp)
        distributed.barrier(f"block {i}'s checkpoint")  # every rank's shard is in place
        if main:
            write_json_atomic(
                self.dir / STATE,
                {
                    "fingerprint": dict(
                        self.fingerprint, model_type=adapter.model_type, num_blocks=len(adapter)
                    ),
                    "next_block": nxt,
                    "last_block": last,
                    "world_size": distributed.world_size(),
                    "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
                    "blocks": state.blocks,
                },
            )
        distributed.barrier(f"block {i}'s checkpoint")  # the new state is in place
        mine = inputs.replace(f"{nxt:03d}", "*", 1)  # this rank's shards of any block
        for p in self.dir.glob(mine):
            if p.name != inputs:
                p.unlink(missing_ok=True)
        _native.crash_point("checkpoint-after-block")

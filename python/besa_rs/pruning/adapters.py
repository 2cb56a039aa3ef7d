"""Model adapters: where a decoder-only causal LM keeps its transformer blocks, which
``nn.Linear`` layers each block has, and how to capture the exact inputs (hidden states and
every keyword argument) the model feeds to each block.

Known layouts (LLaMA 1/2/3 incl. grouped-query attention, Mistral, Qwen2, OPT, GPT-NeoX,
Falcon, Phi...) are found by attribute path; any other decoder-only model works when it has one
``nn.ModuleList`` of ``config.num_hidden_layers`` blocks that contain ``nn.Linear`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

#: attribute paths of the block list, tried in order
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # LLaMA, Mistral, Qwen2, Gemma, Phi-3, ...
    "model.decoder.layers",  # OPT
    "model.model.layers",
    "transformer.h",  # GPT-2 family, Falcon, BLOOM
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.blocks",  # MPT
    "model.transformer.h",
)

#: keyword arguments of a block call that hold a KV cache; dropped (pruning runs without one)
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


@dataclass
class ModelAdapter:
    """The block list of a model and the linear layers of each block."""

    model: nn.Module
    model_type: str
    blocks_path: str
    blocks: nn.ModuleList = field(repr=False)

    def __len__(self) -> int:
        return len(self.blocks)

    def linears(self, index: int) -> dict[str, nn.Linear]:
        """The ``nn.Linear`` layers of block ``index``, by name relative to the block, in
        module order (e.g. ``self_attn.q_proj`` ... ``mlp.down_proj``)."""
        return block_linears(self.blocks[index])


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Finds the transformer blocks of ``model``; raises :class:`ModelError` naming the model
    type when the model has no recognisable block list of linear layers."""
    mtype = model_type(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        raise ModelError(
            f"model type {mtype!r} is an encoder-decoder model; besa-rs prunes decoder-only causal LMs"
        )
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and _has_linear(blocks[0]):
            return ModelAdapter(model, mtype, path, blocks)
    # generic fallback: the ModuleList of num_hidden_layers blocks holding nn.Linear layers
    n_layers = getattr(cfg, "num_hidden_layers", None)
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and _has_linear(m[0]):
            if n_layers is None or len(m) == n_layers:
                candidates.append((len(m), name, m))
    if candidates:
        candidates.sort(key=lambda t: -t[0])
        _, name, m = candidates[0]
        return ModelAdapter(model, mtype, name, m)
    raise ModelError(
        f"model type {mtype!r} ({type(model).__name__}) is not supported: no list of transformer "
        f"blocks with nn.Linear layers found (tried {', '.join(BLOCK_PATHS)} and a generic search)"
    )


# --------------------------------------------------------------------------------------------
# block input capture


class _StopForward(Exception):
    """Raised by the last block's catcher to end the capture forward early."""


class _Catcher(nn.Module):
    """Stands in for a block during capture: records its inputs, returns the hidden states
    unchanged. Unknown attributes (``attention_type``, ``layer_idx``...) come from the block."""

    def __init__(self, block: nn.Module, index: int, store: dict[str, Any], last: bool):
        super().__init__()
        self.block = block
        self.index = index
        self.store = store
        self.last = last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.index == 0:
            self.store["hidden"].append(hidden_states.detach())
        if self.index not in self.store["kwargs"]:
            self.store["kwargs"][self.index] = (args, _clean_kwargs(kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@dataclass
class BlockInputs:
    """What block 0 receives for each calibration sample, and the keyword arguments of every
    block (the same for every sample: no padding, equal lengths)."""

    hidden: list[torch.Tensor]  # one [1, seqlen, hidden] tensor per sample
    block_args: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]


@torch.no_grad()
def capture_block_inputs(
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    cache_device: torch.device | str = "cpu",
    cache_dtype: torch.dtype | None = None,
) -> BlockInputs:
    """Runs the model's embedding stage on each calibration sample (batch of one) and records
    block 0's hidden states and every block's keyword arguments (attention mask, possibly
    ``None``; position ids; rotary ``position_embeddings``; cache position...). The blocks
    themselves are not run."""
    model = adapter.model
    blocks = adapter.blocks
    originals = list(blocks)
    store: dict[str, Any] = {"hidden": [], "kwargs": {}}
    n = len(originals)
    for i, b in enumerate(originals):
        blocks[i] = _Catcher(b, i, store, last=(i == n - 1))
    first_param = next(model.parameters())
    hidden: list[torch.Tensor] = []
    try:
        for s in range(tokens.shape[0]):
            ids = tokens[s : s + 1].to(first_param.device)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            if len(store["hidden"]) != 1:
                raise ModelError(
                    f"model type {adapter.model_type!r}: block 0 at {adapter.blocks_path} was not "
                    f"called exactly once per forward ({len(store['hidden'])} calls)"
                )
            h = store["hidden"].pop()
            hidden.append(h.to(device=cache_device, dtype=cache_dtype or h.dtype))
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    missing = [i for i in range(n) if i not in store["kwargs"]]
    if missing:
        raise ModelError(
            f"model type {adapter.model_type!r}: blocks {missing} were never called during capture"
        )
    return BlockInputs(hidden=hidden, block_args=store["kwargs"])


def to_device(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Moves every tensor in a nested structure of tuples/lists/dicts; floating tensors are cast
    to ``dtype`` when given (masks and ids keep theirs)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device=device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def block_output(out: Any) -> torch.Tensor:
    """A block returns its hidden states, or (in older transformers) a tuple starting with them."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out

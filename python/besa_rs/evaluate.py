"""Perplexity in the standard protocol: the test text tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped); each
window is scored independently; perplexity = exp(mean negative log-likelihood over all predicted
tokens), i.e. exp of the mean of the per-window mean losses (every window predicts ``seqlen-1``
tokens). This is the GPTQ / SparseGPT / Wanda protocol."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, NumericalError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    text: str | torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text`` (a string, or token ids as a 1-D tensor).

    Returns ``{"perplexity", "nll", "tokens", "seqlen", "windows"}`` where ``tokens`` is the
    number of tokens in the scored windows."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .data import tokenize

    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2 (got {seqlen})")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be positive (got {max_windows})")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise ConfigError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    if isinstance(text, torch.Tensor):
        ids = text.reshape(-1).long()
    else:
        if tokenizer is None:
            raise ConfigError("a tokenizer is needed to evaluate on a string")
        ids = tokenize(tokenizer, text)
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    data = ids[: windows * seqlen].view(windows, seqlen)
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=windows, desc="perplexity", unit="win", disable=not progress)
            for start in range(0, windows, batch_size):
                batch = data[start : start + batch_size].to(dev)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                    batch[:, 1:].reshape(-1),
                    reduction="sum",
                )
                total_nll += float(loss)
                bar.update(batch.size(0))
            bar.close()
    finally:
        model.train(was_training)
    predicted = windows * (seqlen - 1)
    nll = total_nll / predicted
    if not math.isfinite(nll):
        raise NumericalError(
            f"perplexity is not finite (mean NLL {nll}): the model produces NaN/inf logits"
        )
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": windows * seqlen,
        "seqlen": seqlen,
        "windows": windows,
    }

"""Perplexity over non-overlapping windows."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, windows: Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> dict[str, float]:
    """Mean next-token NLL over every predicted token of `windows` (N, T), its exponential, and the token count.

    Each window is scored on its own (no context carried over), so T − 1 tokens are predicted per window.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    mean = total / count
    return {"mean_nll": mean, "perplexity": math.exp(mean), "tokens": count}

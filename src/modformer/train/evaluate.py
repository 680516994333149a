"""Validation loss of a model over batches: what the trainer reports at each evaluation,
and what `modformer eval` builds on (`modformer.eval.lm`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token loss over `batches` of (B, T) token ids."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    device = torch.device(device)
    for x in batches:
        x = x.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(input_ids=x, labels=x, use_cache=False)
        loss = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
        n = x.numel() - x.shape[0]  # predictions per window: T - 1
        total_loss += loss.double() * n
        total_tokens += n
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError(
            "nothing to evaluate: the split or file holds fewer tokens than one window"
        )
    mean = float(total_loss) / total_tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": total_tokens}

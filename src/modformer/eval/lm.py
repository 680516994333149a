"""Language-model evaluation: loss and perplexity over a token stream, and the unigram
baseline the demo prints beside it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
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


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `eval_tokens` under the add-one-smoothed unigram
    distribution of `train_tokens`: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[
        :vocab_size
    ]
    probs = (counts + 1.0) / (counts.sum() + vocab_size)
    eval_counts = np.bincount(np.asarray(eval_tokens, dtype=np.int64), minlength=vocab_size)[
        :vocab_size
    ]
    return float(-(eval_counts * np.log(probs)).sum() / max(eval_counts.sum(), 1))

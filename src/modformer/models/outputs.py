"""Model outputs and the loss shared by every modformer language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class ModformerCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what the trainer logs.

    `loss` is what is optimised (`lm_loss` + `aux_loss`); `lm_loss` is the plain
    next-token cross-entropy used for evaluation; `aux_metrics` holds detached scalars or
    small tensors (per-layer aux losses, expert loads) for the metrics file.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_metrics: dict[str, torch.Tensor] | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32; `labels` are the inputs (shifted here), -100 ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
    )


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """HF's `logits_to_keep`: 0 keeps every position, an int n the last n, a tensor those
    indices (generation only needs the last position's logits)."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[:, logits_to_keep]
    return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden

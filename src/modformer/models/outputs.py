"""Model outputs and the loss shared by every modformer language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 5.24 renamed the KV cache, in forward arguments and in model outputs, from
# `past_key_values` to `cache` (the old name still works there, with a deprecation warning).
# Our forwards accept both names, and outputs carry the cache under the installed release's
# field name, so `generate()` finds it on every supported release.
CACHE_FIELD = (
    "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
)


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache a forward was given, under either name (`generate()` of transformers >= 5.24
    passes `cache`, earlier releases and older callers `past_key_values`)."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return past_key_values


def cache_field(cache: Cache | None) -> dict[str, Cache | None]:
    """`{field: cache}` for building a model output under the installed field name."""
    return {CACHE_FIELD: cache}


def output_cache(output: BaseModelOutputWithPast) -> Cache | None:
    """The KV cache of a model output (without the deprecated-name warning of 5.24)."""
    return getattr(output, CACHE_FIELD)


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

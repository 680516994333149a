"""Inference FLOPs of the vanilla GPT (conventions: `modformer.models.flops`)."""

from __future__ import annotations

import torch

from modformer.models.flops import (
    CacheMemory,
    FlopReport,
    FlopTally,
    cache_memory_terms,
    finish_report,
    linear_flops,
    query_key_pairs,
    total_parameters,
)


def count_block_flops(tally: FlopTally, block, real: torch.Tensor, attention: str) -> None:
    """A standard GPT-2 block: every real token runs its attention and its MLP."""
    n = real.sum()
    attn, mlp = block.attn, block.mlp
    tally.add("attention_projections", n, linear_flops(attn.c_attn) + linear_flops(attn.c_proj))
    width = attn.n_head * attn.head_dim
    tally.add("attention_scores", query_key_pairs(real, attention), 4 * width)
    tally.add("ffn", n, linear_flops(mlp.c_fc) + linear_flops(mlp.c_proj))


def gpt_flops(model, input_ids, attention_mask, real, attention) -> FlopReport:
    model.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    tally = FlopTally()
    for block in model.transformer.h:
        count_block_flops(tally, block, real, attention)
    return finish_report(model, tally, real, attention, float(total_parameters(model)))


def gpt_cache_memory(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> CacheMemory:
    """Every layer caches keys and values of n_head * head_dim = n_embd features."""
    return cache_memory_terms(config, batch_size, seq_len, dtype, config.n_layer, config.n_embd)

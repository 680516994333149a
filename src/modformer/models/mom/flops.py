"""Inference FLOPs of Mixture-of-Modules from one forward's routing decisions
(conventions: `modformer.models.flops`): a token pays for the modules it picked at each
chunk step (SKIP costs nothing); routers run for every token at every decision."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from modformer.models.flops import (
    CacheMemory,
    FlopReport,
    FlopTally,
    cache_memory_terms,
    finish_report,
    linear_flops,
    query_key_pairs,
    router_output_flops,
    total_parameters,
    weight_flops,
)
from modformer.models.gpt.flops import count_block_flops
from modformer.models.mom.policies import AssemblyPolicy, LearnedPolicy, MoEPolicy
from modformer.nn.routers import GRURouter, LinearRouter, MLPRouter
from modformer.nn.routing import RoutingDecision

if TYPE_CHECKING:  # the modeling file imports this one
    from modformer.models.mom.modeling_mom import MoMChunk, RoutingStep


def _gate_flops(router: nn.Module, step: int) -> int:
    """FLOPs per token of one routing decision at chunk step `step`."""
    if isinstance(router, (GRURouter, MLPRouter)):
        out = router_output_flops(router.out.in_features, router.out.out_features, router.slots)
    if isinstance(router, GRURouter):
        flops = linear_flops(router.x2h) + out
        # The state is zero at a chunk's first step and the GRU skips that matmul.
        return flops if step == 0 else flops + linear_flops(router.h2h)
    if isinstance(router, MLPRouter):
        return linear_flops(router.fc) + out
    if isinstance(router, LinearRouter):
        return linear_flops(router.out)
    raise ValueError(f"no FLOP formula for router {type(router).__name__}")


def _router_flops(policy: AssemblyPolicy, step: int) -> int:
    """FLOPs per token of a chunk step's routers (fixed policies route by a rule: 0;
    a layer-skip criterion is user code and is not counted)."""
    if isinstance(policy, LearnedPolicy):
        return _gate_flops(policy.attn_router, step) + _gate_flops(policy.ffn_router, step)
    if isinstance(policy, MoEPolicy):
        return _gate_flops(policy.routers[step], step)
    return 0


def _distinct_modules(
    decisions: list[RoutingDecision], num_stored: int, tied: bool
) -> torch.Tensor:
    """(B*T,) how many distinct stored modules each token ran over a chunk's steps.

    decisions: one per step, (B, T, k) picks. With MoM-same (`tied`) every pick runs
    stored module 0.
    """
    n = decisions[0].indices.shape[:-1].numel()
    touched = torch.zeros(n, num_stored + 1, dtype=torch.bool, device=decisions[0].indices.device)
    for decision in decisions:
        decision = decision.flat()
        stored = torch.zeros_like(decision.indices) if tied else decision.indices
        stored = torch.where(decision.picks_module(), stored, num_stored)
        touched.scatter_(1, stored, True)
    return touched[:, :num_stored].sum(1)


def _count_mom_chunk(
    tally: FlopTally,
    chunk: MoMChunk,
    steps: list[RoutingStep],
    real: torch.Tensor,
    attention: str,
) -> tuple[int, float]:
    """Tally one chunk's steps; return (its pool parameters, the sum over real tokens of
    the pool parameters each token touched)."""
    n = real.sum()
    attn, ffn = chunk.attn, chunk.ffn
    attn_pair_flops = weight_flops(attn.qkv_weight) + weight_flops(attn.proj_weight)
    ffn_pair_flops = weight_flops(ffn.fc_weight) + weight_flops(ffn.proj_weight)
    width = attn.n_head * attn.head_dim
    zero_keys = chunk.zero_keys
    for step in steps:
        attn_picks = step.attn.picks_module() & real[..., None]
        tally.add("attention_projections", attn_picks.sum(), attn_pair_flops)
        takes_part = attn_picks.any(-1)  # all-SKIP tokens are no queries ...
        keys = real if zero_keys else None  # ... and no keys, unless they stay zero keys
        tally.add("attention_scores", query_key_pairs(takes_part, attention, keys), 4 * width)
        ffn_picks = step.ffn.picks_module() & real[..., None]
        tally.add("ffn", ffn_picks.sum(), ffn_pair_flops)
        tally.add("router", n, _router_flops(chunk.policy, step.step))

    pool_params, touched_params = 0, 0.0
    real_flat = real.reshape(-1)
    for pool, decisions in ((attn, [s.attn for s in steps]), (ffn, [s.ffn for s in steps])):
        params = sum(p.numel() for p in pool.parameters())
        pool_params += params
        distinct = _distinct_modules(decisions, pool.num_modules, chunk.tied)
        touched_params += int((distinct * real_flat).sum()) * params / pool.num_modules
    return pool_params, touched_params


def mom_flops(model, input_ids, attention_mask, real, attention) -> FlopReport:
    out = model.transformer(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_routing=True
    )
    tally = FlopTally()
    routed_params, touched_params = 0, 0.0
    chunks = {id(chunk) for chunk in model.transformer.chunks}
    for layer in model.transformer.h:
        if id(layer) in chunks:
            steps = [s for s in out.routing if s.chunk == layer.chunk_index]
            params, touched = _count_mom_chunk(tally, layer, steps, real, attention)
            routed_params += params
            touched_params += touched
        else:
            count_block_flops(tally, layer, real, attention)
    n = int(real.sum())
    active = total_parameters(model) - routed_params + touched_params / n
    return finish_report(model, tally, real, attention, active)


def mom_cache_memory(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> CacheMemory:
    """One cache layer per assembled attention layer (fixed blocks + H per chunk), n_embd
    features of keys and values each; key-flag layers when a token may skip a whole
    attention step; the GRU states of the learned policy's two routers."""
    memory = cache_memory_terms(
        config, batch_size, seq_len, dtype, config.num_attention_layers, config.n_embd
    )
    tokens = batch_size * seq_len
    if config.attention_may_skip_all:
        chunk_steps = sum(config.H for n in config.chunk_sizes if n > 1)
        memory.key_flags = chunk_steps * 2 * tokens * torch.bool.itemsize
    if config.policy == "learned" and config.router == "gru":
        memory.router_state = 2 * tokens * config.router_dim * dtype.itemsize
    return memory

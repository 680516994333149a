"""Inference FLOPs of ModuleFormer from one forward's routing decisions (conventions:
`modformer.models.flops`): a token pays for its k attention and k FFN experts; the
routers and the shared key/value projection run for every token."""

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
    router_output_flops,
    total_parameters,
    weight_flops,
)


def moduleformer_flops(model, input_ids, attention_mask, real, attention) -> FlopReport:
    out = model.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    tally = FlopTally()
    n = int(real.sum())
    expert_params, touched_params = 0, 0.0
    for block, routes in zip(model.transformer.h, out.router_outputs):
        for module, route in zip((block.attn, block.mlp), routes):
            router = module.router
            # The expert embedding [A; A'] (inserted rows included).
            # A linear router (JetMoE) has no input projection: A reads x itself.
            proj = router.input_proj
            width = router.expert_embedding.in_features
            embedding = router_output_flops(width, router.num_experts, router.slots)
            tally.add("router", n, (0 if proj is None else linear_flops(proj)) + embedding)
            # top-k picks k distinct experts for every real token (padding picks none).
            pairs = n * route.top_k
            params = sum(p.numel() for p in module.expert_parameters())
            expert_params += params
            touched_params += pairs * params / module.num_experts
        moa, smoe = block.attn, block.mlp
        k_att = routes[0].top_k
        if moa.kv_proj is not None:  # keys/values are shared by the experts: once per token
            tally.add("attention_projections", n, linear_flops(moa.kv_proj))
        tally.add("attention_projections", n * k_att, weight_flops(moa.w_q) + weight_flops(moa.w_o))
        tally.add("attention_scores", query_key_pairs(real, attention), 4 * k_att * moa.att_hidden)
        k_ffd = routes[1].top_k
        tally.add("ffn", n * k_ffd, weight_flops(smoe.w_in) + weight_flops(smoe.w_out))
    active = total_parameters(model) - expert_params + touched_params / n
    return finish_report(model, tally, real, attention, active)


def moduleformer_cache_memory(
    config, batch_size: int, seq_len: int, dtype: torch.dtype
) -> CacheMemory:
    """Every layer caches the shared keys and values, att_hidden features each (all
    attention experts of a layer read the same ones)."""
    return cache_memory_terms(config, batch_size, seq_len, dtype, config.n_layer, config.att_hidden)

"""Mixture-of-Modules' side of the routed-model protocol (`modformer.models.routed`).

Each chunk has two pools, ``chunk{c}/attn`` and ``chunk{c}/ffn``: its attention and FFN
modules, picked again at each of the chunk's H assembly steps (so usage is counted per
step, ``chunk{c}/step{h}/{kind}``). SKIP is a choice of the learned policy with SKIP and
of the layer-skip / early-exit policies. Fixed ``1`` blocks are no pools: every token
runs their one attention and one FFN.

Which parameters belong to module i: every parameter of the chunk's module pool (all
stacked by module along dim 0) and, with the learned policy, row i of the router's output
layer (whose row after the modules is SKIP's).
"""

from __future__ import annotations

from typing import Any

import torch

from modformer.models.routed import (
    ATTN,
    FFN,
    PoolDecision,
    RoutedModel,
    RoutedPool,
    StackedParameter,
)


def chunk_has_skip(config: Any) -> bool:
    """Whether a MoM chunk's choices include SKIP (the pool size as the last index)."""
    if config.policy == "learned":
        return bool(config.skip)
    return config.policy in ("layer_skip", "early_exit")


class MoMRouting(RoutedModel):
    """`RoutedModel` for `MoMForCausalLM` (mixed into it)."""

    routing_family = "mom"
    pool_config_fields = {
        ATTN: ("attn_modules_per_chunk", "attn_module_slots"),
        FFN: ("ffn_modules_per_chunk", "ffn_module_slots"),
    }

    def routed_pools(self) -> list[RoutedPool]:
        config = self.config
        has_skip = chunk_has_skip(config)
        # Top-K must stay possible: K choices counting SKIP, and at least one module.
        min_keep = {
            kind: max(1, k - (1 if config.skip else 0))
            for kind, k in ((ATTN, config.attn_k), (FFN, config.ffn_k))
        }
        names = {id(module): name for name, module in self.named_modules()}
        pools = []
        for chunk in self.transformer.chunks:
            policy = chunk.policy
            for kind, pool, num_modules in (
                (ATTN, chunk.attn, policy.num_attn_modules),
                (FFN, chunk.ffn, policy.num_ffn_modules),
            ):
                prefix = names[id(pool)]
                stacked = [
                    StackedParameter(f"{prefix}.{name}") for name, _ in pool.named_parameters()
                ]
                router = getattr(policy, f"{kind}_router", None)  # the learned policy's
                slots = None
                if router is not None:
                    router_prefix = names[id(router.out)]
                    skip_row = int(config.skip)
                    stacked += [
                        StackedParameter(f"{router_prefix}.{name}", extra_rows=skip_row)
                        for name, _ in router.out.named_parameters()
                    ]
                    if router.slots is not None:
                        slots = tuple(router.slots.slot_list[:num_modules])
                pools.append(
                    RoutedPool(
                        name=f"chunk{chunk.chunk_index}/{kind}",
                        kind=kind,
                        group="chunk",
                        index=chunk.chunk_index,
                        num_choices=num_modules,
                        has_skip=has_skip,
                        label_prefix="M",
                        choice_name="module",
                        min_keep=min_keep[kind],
                        steps=chunk.steps,
                        per_step=True,
                        stacked=tuple(stacked),
                        slots=slots,
                    )
                )
        return pools

    def routing_decisions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[PoolDecision]:
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            return_routing=True,
        )
        pools = {pool.name: pool for pool in self.routed_pools()}
        decisions = []
        for step in out.routing:  # chunk steps in execution order
            for kind, decision in ((ATTN, step.attn), (FFN, step.ffn)):
                pool = pools[f"chunk{step.chunk}/{kind}"]
                decisions.append(PoolDecision(pool, step.step, decision.flat()))
        return decisions

    def check_prunable(self) -> None:
        config = self.config
        if config.policy != "learned" or config.mom_same:
            raise ValueError(
                f"pruning needs a MoM with learned routing and separate modules; this one "
                f"has policy {config.policy!r}, mom_same={config.mom_same} (fixed policies "
                "index modules by step, and MoM-same modules are one module)"
            )
        if config.router_width == "chunk":
            raise ValueError(
                "pruning needs router_width='pool'; this MoM's routers score the chunk's N "
                "choices whatever the pool size (router_width='chunk', the official "
                "num_attn != num_ffn layout), which pruned router slots do not represent"
            )

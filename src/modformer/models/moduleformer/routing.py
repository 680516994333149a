"""ModuleFormer's side of the routed-model protocol (`modformer.models.routed`).

Each layer has two pools, ``layer{l}/attn`` (the MoA's attention experts) and
``layer{l}/ffn`` (the SMoE's FFN experts), one decision each per forward pass, no SKIP.

The configuration's names for the two kinds are older (``att`` / ``ffd``: ``k_att``,
``att_experts_per_layer``, ...); `CONFIG_NAMES` is the one place that maps them.

Which parameters belong to expert i: row i of the stacked expert weights and row i of the
router's expert embedding ``A``. Inserted experts (sec. 4.3) live in parameters of their
own (``*_inserted``) and are appended to those when they become ordinary experts.
"""

from __future__ import annotations

from collections.abc import Mapping
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

# kind -> (the block's submodule, its stacked expert weights, the config's name of the kind)
_BLOCK_POOLS = {ATTN: ("attn", ("w_q", "w_o"), "att"), FFN: ("mlp", ("w_in", "w_out"), "ffd")}
CONFIG_NAMES = {kind: name for kind, (_, _, name) in _BLOCK_POOLS.items()}
_ROUTER_ROWS = ("router.expert_embedding.weight", "router.inserted_expert_embedding.weight")


def _per_layer_or_none(counts: list[int]) -> list[int] | None:
    """None when every layer has the same count (the config's plain form)."""
    return None if len(set(counts)) == 1 else counts


class ModuleFormerRouting(RoutedModel):
    """`RoutedModel` for `ModuleFormerForCausalLM` (mixed into it)."""

    routing_family = "moduleformer"
    pool_config_fields = {
        kind: (f"{name}_experts_per_layer", f"{name}_expert_slots")
        for kind, name in CONFIG_NAMES.items()
    }
    supports_insertion = True

    def _pool_modules(self):
        """(layer, kind, the MoA / SMoE module, its state-dict prefix) in model order."""
        names = {id(module): name for name, module in self.named_modules()}
        for layer, block in enumerate(self.transformer.h):
            for kind, (attr, _, _) in _BLOCK_POOLS.items():
                module = getattr(block, attr)
                yield layer, kind, module, names[id(module)] + "."

    def routed_pools(self) -> list[RoutedPool]:
        pools = []
        for layer, kind, module, prefix in self._pool_modules():
            weights = _BLOCK_POOLS[kind][1]
            stacked = [StackedParameter(prefix + name) for name in (*weights, _ROUTER_ROWS[0])]
            slots = module.router.slots
            pools.append(
                RoutedPool(
                    name=f"layer{layer}/{kind}",
                    kind=kind,
                    group="layer",
                    index=layer,
                    num_choices=module.num_experts,
                    has_skip=False,
                    label_prefix="E",
                    choice_name="expert",
                    min_keep=module.top_k,
                    stacked=tuple(stacked),
                    slots=None if slots is None else tuple(slots.slot_list),
                )
            )
        return pools

    def routing_decisions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[PoolDecision]:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        decisions = [route for routes in out.router_outputs for route in routes]
        return [PoolDecision(pool, 0, d) for pool, d in zip(self.routed_pools(), decisions)]

    def check_prunable(self) -> None:
        if self.inserted_parameter_pairs():
            raise ValueError(
                "this ModuleFormer has inserted experts; merge them first "
                "(modformer.surgery.merge_inserted_experts)"
            )

    # ---- expert insertion (sec. 4.3) ------------------------------------------------------

    def inserted_parameter_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for _, kind, module, prefix in self._pool_modules():
            if module.num_inserted == 0:
                continue
            for name in _BLOCK_POOLS[kind][1]:
                pairs.append((prefix + name, f"{prefix}{name}_inserted"))
            pairs.append((prefix + _ROUTER_ROWS[0], prefix + _ROUTER_ROWS[1]))
        return pairs

    def config_merging_inserted(self) -> dict[str, Any]:
        return {f"n_inserted_{name}_experts": 0 for name in CONFIG_NAMES.values()}

    def config_with_new_choices(self, new_per_kind: Mapping[str, int]) -> dict[str, Any]:
        """Every layer gets ``new_per_kind[kind]`` inserted experts of each kind (a model
        without inserted experts). A pruned model's new experts take router slots after
        the unpruned width, which grows accordingly."""
        config = self.config
        changes: dict[str, Any] = {}
        for kind, name in CONFIG_NAMES.items():
            new = new_per_kind.get(kind, 0)
            counts = [pool.num_choices + new for pool in self.routed_pools() if pool.kind == kind]
            changes[f"n_{name}_experts"] = max(counts)
            changes[f"{name}_experts_per_layer"] = _per_layer_or_none(counts)
            changes[f"n_inserted_{name}_experts"] = new
            slots = getattr(config, f"{name}_expert_slots")
            if slots is not None:
                width = getattr(config, f"n_{name}_experts")
                changes[f"n_{name}_experts"] = width + new
                changes[f"{name}_experts_per_layer"] = counts
                changes[f"{name}_expert_slots"] = [
                    s + list(range(width, width + new)) for s in slots
                ]
        return changes

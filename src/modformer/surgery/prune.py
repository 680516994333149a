"""Pruning experts and modules by activation frequency (ModuleFormer sec. 4.2, 5.3 and
appendix D.2; MoM paper sec. 4.2 / Figure 3; design §3).

The activation frequency ``f_m`` of a module is how often it is in a token's top-k on
some data (`modformer.analysis.usage`), normalised within its layer (ModuleFormer) or
chunk pool (MoM) by the max (the paper's choice) or the sum. Every module with
``f_m < tau`` is removed together with its router row:

- ModuleFormer: attention and FFN experts of each layer, their stacked weights and their
  rows of the expert embedding ``A``; the layers get their own expert counts
  (``att_experts_per_layer`` / ``ffd_experts_per_layer`` in the config), while
  ``n_att_experts`` / ``n_ffd_experts`` keep the unpruned router width.
- MoM (learned policy): attention and FFN modules of each chunk's pool (their LN, weights
  and biases) and their output rows of the chunk's routers; the SKIP row stays. MoM
  frequencies are pooled over the chunk's steps (a module is the same parameters at every
  step) and SKIP is not a module. The chunks get their own pool sizes
  (``attn_modules_per_chunk`` / ``ffn_modules_per_chunk``): the N_A x N_F study of the
  MoM paper's Figure 3, chosen by usage.

Top-k must stay possible: a layer keeps at least k experts (MoM: K choices counting SKIP,
and at least one module). When the threshold leaves fewer, the most used ones are kept
and the report says so (``raised_to_top_k``). A threshold that removes every expert of a
layer is an error rather than a silent top-k model: the usage data give that layer no
support at all, so the threshold is probably wrong.

Pruning a module that no token selects leaves the logits bit-identical. The config
records each kept module's index before pruning (``att_expert_slots`` /
``ffd_expert_slots``; MoM: ``attn_module_slots`` / ``ffn_module_slots``), and the pruned
routers compute their logits and softmax at that unpruned layout with -inf in the empty
slots (`modformer.nn.routers.RouterSlots`): a matmul with fewer output rows would sum in
another order and move the last bit. ModuleFormer's gates are not renormalised, so this
holds when the removed experts' softmax mass is zero in fp32; MoM renormalises over the
kept logits, so its removed modules may hold mass.

The two workflows of sec. 5.3 (prune then fine-tune, fine-tune with load concentration
then prune) are experiment drivers: `modformer.experiments.prune_workflows`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from modformer.analysis.usage import UsageStats, normalize
from modformer.defaults import NORMS
from modformer.models.moduleformer import ModuleFormerForCausalLM
from modformer.models.mom import MoMForCausalLM
from modformer.models.mom.modeling_mom import MoMChunk
from modformer.nn.routers import RouterSlots
from modformer.surgery.extend import (
    SurgeryError,
    count_parameters,
    merge_inserted_experts,
    new_config,
    rebuild,
)


@dataclass
class PoolPlan:
    """What pruning keeps of one pool of modules (a layer's experts, a chunk's pool)."""

    key: str  # usage key: "layer{l}/att|ffd" or "chunk{c}/attn|ffn"
    frequencies: list[float]
    kept: list[int]
    raised_to_top_k: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "before": len(self.frequencies),
            "after": len(self.kept),
            "kept": self.kept,
            "removed": [i for i in range(len(self.frequencies)) if i not in self.kept],
            "frequencies": [round(f, 6) for f in self.frequencies],
            "raised_to_top_k": self.raised_to_top_k,
        }


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise SurgeryError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise SurgeryError(
            f"threshold must be in [0, 1] (frequencies are normalised within each layer), "
            f"got {threshold}"
        )
    return float(threshold)


def _frequencies(
    model: PreTrainedModel,
    usage_or_frequencies: UsageStats | Mapping[str, Any],
    norm: str,
) -> dict[str, torch.Tensor]:
    """Per-pool frequencies normalised by `norm`, whatever form they came in."""
    if norm not in NORMS:
        raise SurgeryError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    arch = "moduleformer" if isinstance(model, ModuleFormerForCausalLM) else "mom"
    if isinstance(usage_or_frequencies, UsageStats):
        if usage_or_frequencies.arch != arch:
            raise SurgeryError(
                f"the usage statistics were collected on a {usage_or_frequencies.arch} model "
                f"but this is a {arch} model; collect them on the model you prune"
            )
        return usage_or_frequencies.module_frequencies(norm)
    if not isinstance(usage_or_frequencies, Mapping):
        raise SurgeryError(
            "pass a UsageStats (modformer.analysis.usage) or a dict of per-pool counts or "
            f"frequencies, got {type(usage_or_frequencies).__name__}"
        )
    out = {}
    for key, values in usage_or_frequencies.items():
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.dim() != 1 or not torch.isfinite(values).all() or (values < 0).any():
            raise SurgeryError(
                f"frequencies[{key!r}] must be a 1-D list of finite non-negative numbers"
            )
        out[key] = normalize(values, norm)
    return out


def plan_pool(
    key: str,
    frequencies: Mapping[str, torch.Tensor],
    num_modules: int,
    threshold: float,
    min_keep: int,
) -> PoolPlan:
    """Which modules of one pool survive `threshold` (at least `min_keep`)."""
    if key not in frequencies:
        raise SurgeryError(
            f"the usage statistics have no entry {key!r}; they were collected on a different "
            f"model (entries: {sorted(frequencies)[:6]}...). Collect them on this model"
        )
    f = frequencies[key].tolist()
    if len(f) != num_modules:
        raise SurgeryError(
            f"usage entry {key!r} counts {len(f)} modules but the model has {num_modules} "
            "there; collect the statistics on the model you prune"
        )
    if max(f) <= 0:
        raise SurgeryError(
            f"no token selected any module of {key} in the usage data (all counts are 0); "
            "collect usage on more data"
        )
    kept = [i for i, freq in enumerate(f) if freq >= threshold]
    if not kept:
        raise SurgeryError(
            f"threshold {threshold} would remove every module of {key} (its largest "
            f"normalised frequency is {max(f):.4g}); lower the threshold"
        )
    raised = len(kept) < min_keep
    if raised:
        # The most used ones; the stable sort keeps the lower index first among ties.
        order = sorted(range(num_modules), key=lambda i: -f[i])
        kept = sorted(order[:min_keep])
    return PoolPlan(key, f, kept, raised)


def _kept_slots(slots: RouterSlots | None, num_modules: int, kept: list[int]) -> list[int]:
    """The router slots of the `kept` modules: where they sat before any pruning."""
    before = list(range(num_modules)) if slots is None else slots.slot_list
    return [before[i] for i in kept]


# ---- ModuleFormer ----------------------------------------------------------------------


def _prune_moduleformer(
    model: ModuleFormerForCausalLM, frequencies: Mapping[str, torch.Tensor], threshold: float
) -> tuple[PreTrainedModel, list[PoolPlan]]:
    config = model.config
    state = dict(model.state_dict())
    plans: list[PoolPlan] = []
    counts: dict[str, list[int]] = {"att": [], "ffd": []}
    slots: dict[str, list[list[int]]] = {"att": [], "ffd": []}
    for layer, block in enumerate(model.transformer.h):
        for kind, module, weights, k in (
            ("att", block.attn, ("w_q", "w_o"), config.k_att),
            ("ffd", block.mlp, ("w_in", "w_out"), config.k_ffd),
        ):
            plan = plan_pool(
                f"layer{layer}/{kind}", frequencies, module.num_experts, threshold, min_keep=k
            )
            plans.append(plan)
            counts[kind].append(len(plan.kept))
            slots[kind].append(_kept_slots(module.router.slots, module.num_experts, plan.kept))
            keep = torch.tensor(plan.kept, dtype=torch.long)
            prefix = f"transformer.h.{layer}.{'attn' if kind == 'att' else 'mlp'}."
            for name in (*weights, "router.expert_embedding.weight"):
                state[prefix + name] = state[prefix + name][keep].clone()
    # n_att_experts / n_ffd_experts stay: the routers' width before pruning.
    pruned_config = new_config(
        config,
        att_experts_per_layer=counts["att"],
        ffd_experts_per_layer=counts["ffd"],
        att_expert_slots=slots["att"],
        ffd_expert_slots=slots["ffd"],
    )
    return rebuild(model, pruned_config, state), plans


# ---- MoM -------------------------------------------------------------------------------


def _prune_mom(
    model: MoMForCausalLM, frequencies: Mapping[str, torch.Tensor], threshold: float
) -> tuple[PreTrainedModel, list[PoolPlan]]:
    config = model.config
    if config.policy != "learned" or config.mom_same:
        raise SurgeryError(
            f"pruning needs a MoM with learned routing and separate modules; this one has "
            f"policy {config.policy!r}, mom_same={config.mom_same} (fixed policies index "
            "modules by step, and MoM-same modules are one module)"
        )
    if config.router_width == "chunk":
        raise SurgeryError(
            "pruning needs router_width='pool'; this MoM's routers score the chunk's N choices "
            "whatever the pool size (router_width='chunk', the official num_attn != num_ffn "
            "layout), which pruned router slots do not represent"
        )
    min_keep = max(1, config.K - (1 if config.skip else 0))
    state = dict(model.state_dict())
    plans: list[PoolPlan] = []
    sizes: dict[str, list[int]] = {"attn": [], "ffn": []}
    slots: dict[str, list[list[int]]] = {"attn": [], "ffn": []}
    for layer_index, chunk in enumerate(model.transformer.h):
        if not isinstance(chunk, MoMChunk):
            continue  # a fixed block: nothing routed
        c = chunk.chunk_index
        for kind, pool, router in (
            ("attn", chunk.attn, chunk.policy.attn_router),
            ("ffn", chunk.ffn, chunk.policy.ffn_router),
        ):
            plan = plan_pool(f"chunk{c}/{kind}", frequencies, pool.num_modules, threshold, min_keep)
            plans.append(plan)
            sizes[kind].append(len(plan.kept))
            slots[kind].append(_kept_slots(router.slots, pool.num_modules, plan.kept))
            keep = torch.tensor(plan.kept, dtype=torch.long)
            prefix = f"transformer.h.{layer_index}."
            # Every pool parameter is stacked by module along dim 0.
            for name, _ in pool.named_parameters(recurse=False):
                key = f"{prefix}{kind}.{name}"
                state[key] = state[key][keep].clone()
            # Router output rows: the kept modules in order, then SKIP (the last row).
            rows = torch.cat([keep, torch.tensor([pool.num_modules])]) if config.skip else keep
            for name, _ in router.out.named_parameters():
                key = f"{prefix}policy.{kind}_router.out.{name}"
                state[key] = state[key][rows].clone()
    pruned_config = new_config(
        config,
        attn_modules_per_chunk=sizes["attn"],
        ffn_modules_per_chunk=sizes["ffn"],
        attn_module_slots=slots["attn"],
        ffn_module_slots=slots["ffn"],
    )
    return rebuild(model, pruned_config, state), plans


# ---- entry points ----------------------------------------------------------------------


def prune_model(
    model: PreTrainedModel,
    usage_or_frequencies: UsageStats | Mapping[str, Any],
    threshold: float,
    norm: str = "max",
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Remove every module whose normalised activation frequency is below `threshold`.

    `usage_or_frequencies`: a `UsageStats` of this model, or a dict of per-pool counts or
    frequencies keyed like `UsageStats.module_frequencies` ("layer{l}/att", "layer{l}/ffd"
    for ModuleFormer, "chunk{c}/attn", "chunk{c}/ffn" for MoM, SKIP excluded); they are
    normalised within each pool by `norm` ("max" as the paper, or "sum").

    Returns the pruned model (a new model; `model` is untouched) and a JSON-able report:
    parameters before/after and, per pool, the kept module indices and the frequencies.
    A ModuleFormer with inserted experts is merged first (they become ordinary experts).
    """
    threshold = _check_threshold(threshold)
    if not isinstance(model, (ModuleFormerForCausalLM, MoMForCausalLM)):
        raise SurgeryError(
            f"{type(model).__name__} has no modules to prune; pruning needs a ModuleFormer "
            "or MoM model (arch 'moduleformer' or 'mom')"
        )
    frequencies = _frequencies(model, usage_or_frequencies, norm)
    merged = False
    if isinstance(model, ModuleFormerForCausalLM):
        merged = model.config.n_inserted_att_experts + model.config.n_inserted_ffd_experts > 0
        pruned, plans = _prune_moduleformer(merge_inserted_experts(model), frequencies, threshold)
    else:
        pruned, plans = _prune_mom(model, frequencies, threshold)
    before, after = count_parameters(model), count_parameters(pruned)
    report = {
        "arch": "moduleformer" if isinstance(model, ModuleFormerForCausalLM) else "mom",
        "threshold": threshold,
        "norm": norm,
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before,
        "merged_inserted_experts": merged,
        "pools": [plan.to_json() for plan in plans],
    }
    return pruned, report


def format_prune_report(report: Mapping[str, Any]) -> str:
    """One line per pool: kept/before, removed indices, plus the parameter totals."""
    lines = [
        f"pruned {report['arch']} at threshold {report['threshold']} ({report['norm']}-normalised)"
    ]
    for pool in report["pools"]:
        note = "  (kept the top-k most used)" if pool["raised_to_top_k"] else ""
        lines.append(
            f"  {pool['key']:<14} {pool['after']:>3}/{pool['before']:<3} kept, "
            f"removed {pool['removed']}{note}"
        )
    lines.append(
        f"parameters: {report['params_before']:,} -> {report['params_after']:,} "
        f"({100 * report['params_ratio']:.1f}%)"
    )
    return "\n".join(lines)

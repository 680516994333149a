"""Pruning experts and modules by activation frequency (ModuleFormer sec. 4.2, 5.3 and
appendix D.2; MoM paper sec. 4.2 / Figure 3; design §3).

The activation frequency ``f_m`` of a module is how often it is in a token's top-k on
some data (`modformer.analysis.usage`), normalised within its layer (ModuleFormer) or
chunk pool (MoM) by the max (the paper's choice) or the sum. Every module with
``f_m < tau`` is removed together with its router row. The surgery is the same for
every family: it loops over the model's routed pools (`modformer.models.routed`), keeps
the chosen rows of each pool's stacked parameters (the pool's declarative key map) and
asks the model for the config of the smaller pools:

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
from modformer.models.routed import RoutedModel, RoutedPool, canonical_pool_key
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

    key: str  # the pool's name: "layer{l}/attn|ffn" or "chunk{c}/attn|ffn"
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
    arch = model.routing_family
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
        out[canonical_pool_key(key)] = normalize(values, norm)
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


def _check_prunable(model: RoutedModel) -> None:
    try:
        model.check_prunable()
    except ValueError as error:
        raise SurgeryError(str(error)) from None


def _keep_rows(
    state: dict[str, torch.Tensor], pool: RoutedPool, kept: list[int]
) -> dict[str, torch.Tensor]:
    """`state` with only the `kept` choices' rows of the pool's stacked parameters (and
    each parameter's extra rows after the choices, e.g. a router's SKIP row)."""
    for param in pool.stacked:
        extra = list(range(pool.num_choices, pool.num_choices + param.extra_rows))
        rows = torch.tensor(kept + extra, dtype=torch.long)
        state[param.key] = state[param.key][rows].clone()
    return state


def _prune_pools(
    model: RoutedModel, frequencies: Mapping[str, torch.Tensor], threshold: float
) -> tuple[PreTrainedModel, list[PoolPlan]]:
    """Plan every pool, keep the planned rows, rebuild at the model's smaller config."""
    _check_prunable(model)
    state = dict(model.state_dict())
    plans: list[PoolPlan] = []
    for pool in model.routed_pools():
        plan = plan_pool(pool.name, frequencies, pool.num_choices, threshold, pool.min_keep)
        plans.append(plan)
        state = _keep_rows(state, pool, plan.kept)
    kept = {plan.key: plan.kept for plan in plans}
    return rebuild(model, new_config(model.config, **model.config_keeping(kept)), state), plans


# ---- entry points ----------------------------------------------------------------------


def prune_model(
    model: PreTrainedModel,
    usage_or_frequencies: UsageStats | Mapping[str, Any],
    threshold: float,
    norm: str = "max",
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Remove every module whose normalised activation frequency is below `threshold`.

    `usage_or_frequencies`: a `UsageStats` of this model, or a dict of per-pool counts or
    frequencies keyed like `UsageStats.module_frequencies` (the pool names: "layer{l}/attn",
    "layer{l}/ffn" for ModuleFormer, "chunk{c}/attn", "chunk{c}/ffn" for MoM, SKIP
    excluded; the old ModuleFormer names "att" / "ffd" are read too); they are
    normalised within each pool by `norm` ("max" as the paper, or "sum").

    Returns the pruned model (a new model; `model` is untouched) and a JSON-able report:
    parameters before/after and, per pool, the kept module indices and the frequencies.
    A ModuleFormer with inserted experts is merged first (they become ordinary experts).
    """
    threshold = _check_threshold(threshold)
    if not isinstance(model, RoutedModel):
        raise SurgeryError(
            f"{type(model).__name__} has no modules to prune; pruning needs a routed model "
            "(a ModuleFormer or MoM)"
        )
    frequencies = _frequencies(model, usage_or_frequencies, norm)
    merged = bool(model.inserted_parameter_pairs())
    source = merge_inserted_experts(model) if merged else model
    pruned, plans = _prune_pools(source, frequencies, threshold)
    before, after = count_parameters(model), count_parameters(pruned)
    report = {
        "arch": model.routing_family,
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

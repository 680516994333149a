"""Experiment 7 (ModuleFormer Table 4): the load-balancing loss and the attention type.

Arms (the tiny ModuleFormer, same data, batches, steps and tokens per seed; only the
named option changes, so parameters and FLOPs per token are equal up to routing):

- ``mi`` (the baseline): the mutual-information balance loss (eq. 7), stick-breaking
  attention: the paper's MoLM recipe.
- ``switch``: the ST-MoE / Switch balance loss + z-loss instead (Table 4, "- MI loss +
  ST-MoE loss"); the same ``aux_loss_weight`` (0.01) and z-loss 0.1 x that.
- ``none``: no balance loss (Table 4, "- MI loss").
- ``softmax_rope``: MI loss, causal softmax attention with RoPE instead of stick-breaking
  (Table 4, "- Stick-breaking + Softmax&RoPE").
- ``mi_x10``: the MI loss at ten times the weight (0.1): the one lever tried, since at
  the paper's weight MI did not beat "none" at this scale (docs/results.md).

Per arm, beside the loss: the usage of the experts on the whole validation split
(`modformer.analysis.usage`): the mean normalised entropy of each router's usage
distribution (1 = uniform, 0 = one expert takes every token), dead experts (picked by no
validation token) and rare experts (under a tenth of the uniform share), out of all the
experts of all routers. For the two attention types, length extrapolation: the loss on
the whole validation split in windows of twice the training length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modformer.experiments.common import results_table, write_outputs
from modformer.experiments.moduleformer_vs_dense import (
    comparisons_payload,
    data_dir,
    scale_of,
    train_arm,
)

NAME = "moduleformer-balance"
BASELINE = "mi"
RARE_FRACTION = 0.1  # an expert is "rare" under this fraction of the uniform share

_TINY = dict(arch="moduleformer", preset="tiny")
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    BASELINE: ("MI balance loss, stick-breaking attention (the paper's recipe)", _TINY),
    "switch": (
        "Switch/ST-MoE balance + z-loss instead of MI",
        dict(_TINY, overrides=dict(aux_loss_type="switch")),
    ),
    "none": ("no balance loss", dict(_TINY, overrides=dict(aux_loss_type="none"))),
    "softmax_rope": (
        "MI loss, softmax attention with RoPE instead of stick-breaking",
        dict(_TINY, overrides=dict(attention_type="softmax_rope")),
    ),
    # The lever tried because MI did not beat "none" at the paper's weight: a 10x weight.
    "mi_x10": (
        "MI balance loss at 10x the weight (aux_loss_weight 0.1): the lever",
        dict(_TINY, overrides=dict(aux_loss_weight=0.1)),
    ),
}
EXTRAPOLATION_ARMS = (BASELINE, "softmax_rope")


def usage_summary(counts: dict[str, Any]) -> dict[str, float]:
    """Mean normalised entropy over routers, dead and rare experts, from per-router pick
    counts (`UsageStats.counts`: key -> (n_experts,) tensor)."""
    entropies, dead, rare, total = [], 0, 0, 0
    for c in counts.values():
        c = c.double()
        n = c.numel()
        p = c / c.sum().clamp_min(1)
        h = -(p[p > 0] * p[p > 0].log()).sum().item()
        entropies.append(h / math.log(n) if n > 1 else 1.0)
        dead += int((c == 0).sum())
        rare += int((p < RARE_FRACTION / n).sum())
        total += n
    return {
        "usage_entropy": sum(entropies) / len(entropies),
        "usage_entropy_min": min(entropies),
        "dead_experts": dead,
        "rare_experts": rare,
        "experts": total,
    }


def _after(block_size: int, data: Path, arm: str):
    """Usage statistics on the whole validation split and, for the attention arms, the
    loss at twice the training length."""

    def measure(model, run_dir: Path) -> dict[str, Any]:
        from modformer.analysis.usage import collect_usage_on_data
        from modformer.eval.lm import evaluate_split

        stats = collect_usage_on_data(
            model, data, block_size=block_size, batch_size=16, per_domain=False
        )
        extra: dict[str, Any] = usage_summary(stats.counts)
        if arm in EXTRAPOLATION_ARMS:
            long = evaluate_split(model, str(data), "val", block_size=2 * block_size, batch_size=8)
            extra["val_loss_2x_length"] = long["all"]["loss"]
        return extra

    return measure


def _per_arm_rows(results, arms: Sequence[str]) -> str:
    import statistics

    lines = [
        "| arm | usage entropy (mean over routers; min) | dead experts | rare experts "
        "| val loss at 2x length | 2x minus 1x |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rows = [r for r in results if r.arm == arm]
        if not rows:
            continue

        def ms(key: str, rows=rows) -> str:
            values = [r.extra[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            return f"{statistics.fmean(values):.3f} +- {sd:.3f}"

        experts = rows[0].extra["experts"]
        dead = "/".join(str(r.extra["dead_experts"]) for r in rows)
        rare = "/".join(str(r.extra["rare_experts"]) for r in rows)
        if "val_loss_2x_length" in rows[0].extra:
            long = ms("val_loss_2x_length")
            gaps = [r.extra["val_loss_2x_length"] - r.val_loss for r in rows]
            gap = f"{statistics.fmean(gaps):+.3f}"
        else:
            long = gap = "-"
        lines.append(
            f"| {arm} | {ms('usage_entropy')}; {ms('usage_entropy_min')} "
            f"| {dead} of {experts} | {rare} of {experts} | {long} | {gap} |"
        )
    return "\n".join(lines)


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    sc = scale_of(scale)
    data = data_dir()
    start = time.perf_counter()
    results = [
        train_arm(out_dir, arm, seed, data, sc, model, after=_after(sc.block_size, data, arm))
        for seed in seeds
        for arm, (_, model) in ARMS.items()
    ]
    arms = list(ARMS)
    wall = time.perf_counter() - start
    descriptions = {arm: d for arm, (d, _) in ARMS.items()}
    markdown = "\n".join(
        [
            f"# {NAME} (scale {scale}, seeds {list(seeds)}, {sc.steps} steps x "
            f"{sc.batch_size} x {sc.block_size} tokens, lr {sc.lr})",
            "",
            f"Baseline: {BASELINE}. Matched: equal parameters, FLOPs per token (up to "
            "routing), tokens and steps; only the named option differs.",
            "",
            results_table(results, BASELINE, arms),
            "",
            *[f"- {arm}: {d}" for arm, d in descriptions.items()],
            "",
            "Expert usage on the whole validation split (mean +- sd over seeds; dead: picked "
            f"by no token, rare: under {RARE_FRACTION:g} of the uniform share, per seed) and "
            f"length extrapolation (whole validation split in windows of "
            f"{2 * sc.block_size} tokens, trained on {sc.block_size}):",
            "",
            _per_arm_rows(results, arms),
            "",
            f"Wall time of this invocation: {wall:.0f} s (stored arms are not retrained).",
        ]
    )
    payload = {
        "scale": scale,
        "seeds": list(seeds),
        "settings": sc.__dict__,
        "baseline": BASELINE,
        "arms": descriptions,
        "comparisons": comparisons_payload(results, arms, BASELINE),
        "wall_seconds": wall,
        "results": [r.__dict__ for r in results],
    }
    write_outputs(out_dir, NAME, payload, markdown)
    return payload

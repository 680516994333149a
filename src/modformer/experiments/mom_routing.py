"""Routing structure of the trained MoM models (MoM paper Fig. 6, App. D.2, at CPU scale):
`modformer reproduce mom-routing`. It reads the MoM_E / MoM_I / MoM_P models of
`mom-vs-vanilla` (running that experiment first; its stored arms are not retrained) and
trains the arms App. D.2 needs beside them, from the same phase-1 models for the same
phase-2 steps (`ROUTING_ARMS`): MoM_P with the depth-wise Switch balance loss, and K = 1
models (K1H6S), where a token can pick SKIP alone, with and without that loss.

Per model and seed, on the scale's share of each domain's validation windows (the whole
split at the full scale):

- depth-order diagonal mass: the fraction of a chunk step's picks that are the module a
  depth-ordered stack would run there (module ``h * N // H`` at step h of H, so module h
  when H = N), averaged over steps and over attention and FFN; chance (uniform routing
  over the N modules and SKIP) is ``1 / (N + 1)``;
- SKIP rate: the fraction of picks that are SKIP;
- all-SKIP rate: the fraction of (token, step) decisions whose K picks are all SKIP (the
  K picks are distinct choices, so only K = 1 can pick SKIP alone: for K >= 2 it is 0 by
  construction, and we measure it anyway).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from modformer.experiments import mom_vs_vanilla
from modformer.experiments.common import (
    ArmResult,
    compare,
    results_table,
    run_arm,
    sibling_experiment_dir,
    write_outputs,
)
from modformer.experiments.mom_vs_vanilla import (
    MOM_ARMS,
    SCALES,
    data_dir,
    phase1,
    phase2_arm,
    shared_dir,
)

NAME = "mom-routing"
# The official code's balance-loss weight (design: MoM balance loss).
BALANCE_WEIGHT = 0.01
# Trained here: arm -> (MoM name, balance-loss weight).
ROUTING_ARMS = {
    "mom_p_balance": ("K2H6S", BALANCE_WEIGHT),
    "mom_k1": ("K1H6S", 0.0),
    "mom_k1_balance": ("K1H6S", BALANCE_WEIGHT),
}


def depth_module(step: int, num_modules: int, steps: int) -> int:
    """The module a depth-ordered stack runs at chunk step `step` of `steps`."""
    return step * num_modules // steps


@torch.no_grad()
def routing_structure(model_dir: Path, data: Path, block_size: int, batch_size: int,
                      val_fraction: float) -> dict[str, float]:  # fmt: skip
    """Diagonal mass, its chance level, SKIP and all-SKIP rates of one MoM model."""
    from modformer.data.dataset import TokenDataset
    from modformer.models.loading import load_model

    model = load_model(model_dir).eval()
    base = getattr(model, "base_model", model)
    config = base.config
    if not config.skip:
        raise ValueError(f"{model_dir} has no SKIP module; this analysis needs a K..H..S MoM")
    val = TokenDataset(data, "val")
    diag = picks = skips = all_skip = decisions = 0.0
    pool_sizes = set()
    for name, (first, end) in val.domain_ranges.items():
        batches = max(1, math.ceil((end - first) * val_fraction / (block_size * batch_size)))
        iterator = val.iter_sequential(block_size, batch_size, domain=name)
        for _, x in zip(range(batches), iterator):
            out = base(input_ids=x, use_cache=False, return_routing=True)
            for route in out.routing:
                for decision in (route.attn.flat(), route.ffn.flat()):  # (tokens, K) picks
                    n = decision.num_choices
                    pool_sizes.add(n)
                    skipped = ~decision.picks_module()
                    diag += (decision.indices == depth_module(route.step, n, config.H)).sum().item()
                    skips += skipped.sum().item()
                    picks += skipped.numel()
                    all_skip += skipped.all(dim=-1).sum().item()
                    decisions += skipped.shape[0]
    (n,) = pool_sizes  # one routed chunk in these models
    return {
        "diagonal_mass": diag / picks,
        "chance": 1 / (n + 1),
        "skip_rate": skips / picks,
        "all_skip_rate": all_skip / decisions,
        "K": config.K,
        "H": config.H,
    }


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    start = time.perf_counter()
    exp1 = sibling_experiment_dir(out_dir, mom_vs_vanilla.NAME, scale)
    mom_vs_vanilla.run(exp1, seeds, scale)  # trains only what is not stored yet
    s, data = SCALES[scale], data_dir(out_dir)
    losses: list[ArmResult] = []
    for seed in seeds:
        p1 = phase1(exp1, scale, seed)
        losses.append(run_arm(shared_dir(exp1, scale), "mom_p", seed, None))
        for arm, (mom_name, weight) in ROUTING_ARMS.items():
            losses.append(
                phase2_arm(
                    out_dir, arm, seed, scale, p1, mom_name=mom_name, balance_loss_weight=weight
                )  # fmt: skip
            )
    rows = []
    arms = {a: n for a, n in MOM_ARMS.items() if a == "mom_p" or not s.core_only}
    arms |= {arm: mom_name for arm, (mom_name, _) in ROUTING_ARMS.items()}
    for arm, mom_name in arms.items():
        if arm in ROUTING_ARMS:
            root = out_dir
        else:
            root = shared_dir(exp1, scale) if arm == "mom_p" else exp1
        for seed in seeds:
            model_dir = root / "runs" / arm / f"seed_{seed}" / "model"
            m = routing_structure(model_dir, data, s.block_size, s.eval_batch_size,
                                  s.val_fraction)  # fmt: skip
            rows.append({"arm": arm, "mom": mom_name, "seed": seed, **m})
    lines = [
        f"# {NAME} ({scale}; models of {mom_vs_vanilla.NAME}, "
        + (
            "the whole validation split)"
            if s.val_fraction >= 1
            else f"val: first {s.val_fraction:.0%} of each domain)"
        ),  # fmt: skip
        "",
        "| arm | seeds | depth-order diagonal mass (mean +- sd) | chance | SKIP rate | all-SKIP rate |",
        "|---|---|---|---|---|---|",
    ]
    for arm, mom_name in arms.items():
        r = [row for row in rows if row["arm"] == arm]
        d = [row["diagonal_mass"] for row in r]
        mean = sum(d) / len(d)
        sd = (sum((v - mean) ** 2 for v in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else math.nan
        skip = sum(row["skip_rate"] for row in r) / len(r)
        every = sum(row["all_skip_rate"] for row in r) / len(r)
        lines.append(
            f"| {arm} ({mom_name}) | {len(r)} | {mean:.3f} +- {sd:.3f} | {r[0]['chance']:.3f} "
            f"| {skip:.3f} | {every:.4f} |"
        )
    order = ["mom_p", *ROUTING_ARMS]
    lines += [
        "",
        "Validation loss of the arms trained here against MoM_P (same phase-1 model, steps "
        f"and batches; balance-loss weight {BALANCE_WEIGHT}):",
        "",
        results_table(losses, "mom_p", order),
    ]
    comparisons = {f"{a} vs mom_p": asdict(compare(losses, a, "mom_p")) for a in ROUTING_ARMS}
    seconds = time.perf_counter() - start
    lines += ["", f"Wall time of this run: {seconds:.0f} s"]
    payload = {
        "scale": scale,
        "seeds": list(seeds),
        "rows": rows,
        "results": [asdict(r) for r in losses],
        "comparisons": comparisons,
        "wall_seconds": seconds,
    }
    write_outputs(out_dir, NAME, payload, "\n".join(lines))
    return payload

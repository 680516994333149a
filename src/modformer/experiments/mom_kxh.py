"""K x H grid with a vanilla reference (MoM paper Fig. 4) and GRU vs MLP routers in
two-phase training with gradient-spike counts (App. D.1): `modformer reproduce mom-kxh`.

Every arm is phase 2 of `mom_vs_vanilla` (its scales, data, recipe and the shared phase-1
models): the seed's phase-1 vanilla model continued for the phase-2 steps, as

- ``vanilla_cont`` (the reference): the vanilla model itself;
- ``K{k}H{h}S`` for k in `GRID_K`, h in `GRID_H`: MoM with SKIP on chunks ``[1-4-1]``,
  GRU routers. The grid is the paper's K in 1..4, H in 1..6 cut to the subset that fits
  the 2-core CPU budget (K4 and H3/H5 left out: the paper's curves are monotone in H and
  flatten past K = 2). It runs for the first `GRID_SEEDS` seeds (3: the cells differ
  by about 0.01, so one seed cannot order them); the vanilla reference for every seed;
- ``router_gru`` / ``router_mlp``: MoM ``K1H4`` (the paper's Fig. 5 model, no SKIP) with
  a GRU or a two-layer MLP router, for every seed.

Every arm logs its gradient norm (before clipping) at every step, and a **gradient spike**
is a step whose norm exceeds `SPIKE_FACTOR` times the median of the norms of the up to
`SPIKE_WINDOW` previous steps (counted from step `SPIKE_WINDOW // 4 + 1`, so the median
has a few steps behind it). Each arm records its spike count, the spiking steps and the
largest ratio norm / running median (a continuous measure that does not hinge on the
threshold).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modformer.experiments.common import (
    ArmResult,
    compare,
    mean_sd,
    results_table,
    run_arm,
    write_outputs,
)
from modformer.experiments.mom_vs_vanilla import (
    CHUNKS,
    SCALES,
    data_dir,
    locked_arm,
    mom_init,
    phase1,
    shared_dir,
    train_and_measure,
)

NAME = "mom-kxh"
GRID_K = (1, 2, 3)
GRID_H = (1, 2, 4, 6)
GRID_SEEDS = 3  # the grid runs for this many of the given seeds (the first ones)
ROUTER_MOM = "K1H4"  # the paper's Fig. 5 model (MoM-small K1H4)
ROUTER_ARMS = {"router_gru": "gru", "router_mlp": "mlp"}
SPIKE_FACTOR = 5.0
SPIKE_WINDOW = 20


def grid_arm(k: int, h: int) -> str:
    return f"K{k}H{h}S"


def grad_spikes(
    norms: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW
) -> dict[str, Any]:
    """Spikes of a gradient-norm series (see the module docstring): their count, their
    steps (1-based) and the largest norm / running-median ratio (None: series too short)."""
    if factor <= 1 or window < 4:
        raise ValueError(f"need factor > 1 and window >= 4, got factor={factor}, window={window}")
    first = window // 4  # 0-based index of the first step judged
    steps, ratios = [], []
    for t in range(first, len(norms)):
        median = statistics.median(norms[max(0, t - window) : t])
        ratio = norms[t] / median if median > 0 else float("inf")
        ratios.append(ratio)
        if ratio > factor:
            steps.append(t + 1)
    return {
        "spikes": len(steps),
        "spike_steps": steps,
        "max_norm_ratio": max(ratios) if ratios else None,
    }


def read_grad_norms(metrics_path: Path) -> list[float]:
    """The per-step gradient norms a run logged (trainer `log_interval=1`), in step order."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    logged = sorted((r["step"], r["grad_norm"]) for r in rows if "grad_norm" in r)
    return [norm for _, norm in logged]


def logged_arm(
    out_dir: Path, arm: str, seed: int, scale: str, phase1_model: Path,
    mom_name: str | None = None, **overrides: Any
) -> ArmResult:  # fmt: skip
    """Phase 2 from the seed's phase-1 model (a MoM when mom_name is given, else the vanilla
    model), logging every step's gradient norm; the result carries the spike statistics."""
    s, data = SCALES[scale], data_dir(out_dir)

    def fn(run: Path) -> ArmResult:
        init = phase1_model
        if mom_name is not None:
            init = mom_init(phase1_model, run.parent / f"{run.name}_init", mom_name, **overrides)
        result = train_and_measure(
            arm, seed, s, data, run, s.phase2_steps, init_from=str(init), log_interval=1
        )
        norms = read_grad_norms(run / "metrics.jsonl")
        if len(norms) != s.phase2_steps:
            raise RuntimeError(
                f"{arm}: {len(norms)} gradient norms logged for {s.phase2_steps} steps"
            )
        result.extra.update(grad_norms=norms, **grad_spikes(norms))
        return result

    return locked_arm(out_dir, arm, seed, fn)


def grid_markdown(results: Sequence[ArmResult]) -> str:
    """K rows x H columns: each cell's mean val loss over its seeds, its paired difference
    to vanilla_cont +- SE, and its FLOPs per token over vanilla's."""
    flops = {r.arm: r.flops_per_token for r in results}
    lines = [
        "| K \\ H | " + " | ".join(str(h) for h in GRID_H) + " |",
        "|---|" + "---|" * len(GRID_H),
    ]
    for k in GRID_K:
        cells = []
        for h in GRID_H:
            arm = grid_arm(k, h)
            if arm not in flops:
                cells.append("")
                continue
            c = compare(results, arm, "vanilla_cont")
            se = "" if math.isnan(c.diff_se) else f" +- {c.diff_se:.4f}"
            ratio = flops[arm] / flops["vanilla_cont"]
            cells.append(
                f"{c.mean:.4f} ({c.diff_mean:+.4f}{se}, n={len(c.seeds)}; FLOPs x{ratio:.2f})"
            )
        lines.append(f"| K={k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def router_markdown(results: Sequence[ArmResult]) -> str:
    lines = [
        "| arm | seeds | val loss (mean +- sd) | spikes per run (mean +- sd) | spikes per seed "
        "| max norm / running median (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ("vanilla_cont", *ROUTER_ARMS):
        rows = sorted((r for r in results if r.arm == arm), key=lambda r: r.seed)
        if not rows:
            continue
        loss, loss_sd = mean_sd(r.val_loss for r in rows)
        spikes, spikes_sd = mean_sd(float(r.extra["spikes"]) for r in rows)
        ratios = [r.extra["max_norm_ratio"] for r in rows if r.extra["max_norm_ratio"] is not None]
        ratio = f"{statistics.fmean(ratios):.2f}" if ratios else "n/a"
        per_seed = ", ".join(str(r.extra["spikes"]) for r in rows)
        lines.append(
            f"| {arm} | {len(rows)} | {loss:.4f} +- {loss_sd:.4f} | {spikes:.2f} +- "
            f"{spikes_sd:.2f} | {per_seed} | {ratio} |"
        )
    return "\n".join(lines)


def grid_order() -> list[tuple[int, int]]:
    """The grid's cells cheapest first (compute grows with K * H), so a run stopped early
    still spans the grid's small corner."""
    return sorted(((k, h) for k in GRID_K for h in GRID_H), key=lambda kh: (kh[0] * kh[1], kh))


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    start = time.perf_counter()
    results: list[ArmResult] = []
    models = {seed: phase1(out_dir, scale, seed) for seed in seeds}
    grid_seeds = list(seeds[:GRID_SEEDS])
    # Tables after every arm (a stopped run leaves what it has): the references first,
    # then one seed of each router, the grid cheapest first, the other router seeds.
    plan = [("vanilla_cont", seed, None, {}) for seed in seeds]
    plan += [(arm, seeds[0], ROUTER_MOM, {"router": r}) for arm, r in ROUTER_ARMS.items()]
    plan += [(grid_arm(k, h), seed, grid_arm(k, h), {}) for seed in grid_seeds
             for k, h in grid_order()]  # fmt: skip
    plan += [(arm, seed, ROUTER_MOM, {"router": r}) for seed in seeds[1:]
             for arm, r in ROUTER_ARMS.items()]  # fmt: skip
    for arm, seed, mom_name, overrides in plan:
        results.append(logged_arm(out_dir, arm, seed, scale, models[seed], mom_name, **overrides))
        payload = write(out_dir, seeds, scale, results, grid_seeds, start)
    return payload


def write(
    out_dir: Path, seeds: Sequence[int], scale: str, results: list[ArmResult],
    grid_seeds: list[int], start: float,
) -> dict:  # fmt: skip
    """results.json and results.md from the arms trained so far."""
    s = SCALES[scale]
    seconds = time.perf_counter() - start
    grid_arms = [grid_arm(k, h) for k in GRID_K for h in GRID_H]
    phase1_rows = [run_arm(shared_dir(out_dir, scale), "phase1", seed, None) for seed in seeds]
    present = {r.arm for r in results}
    comparisons = {
        f"{a} vs {b}": asdict(compare(results, a, b))
        for a, b in [("router_mlp", "router_gru"), ("router_gru", "vanilla_cont"),
                     ("router_mlp", "vanilla_cont")]
        if a in present and b in present
    }  # fmt: skip
    parts = [
        f"# {NAME} ({scale}: {s.n_layer} layers, d={s.n_embd}, chunks {CHUNKS}, phase 2 "
        f"{s.phase2_steps} steps from the shared phase-1 models, batch {s.batch_size} x "
        f"{s.block_size}, "
        + (
            "the whole validation split)"
            if s.val_fraction >= 1
            else f"val: first {s.val_fraction:.0%} of each domain)"
        ),
        f"## K x H grid (MoM with SKIP, GRU routers; seed(s) {grid_seeds})",
        "Val loss, mean over seeds (paired difference to vanilla continued +- SE, seeds; "
        "FLOPs per token / vanilla's):",
        grid_markdown(results),
        results_table(results, "vanilla_cont", ["vanilla_cont", *grid_arms]),
        f"## GRU vs MLP router, two-phase {ROUTER_MOM} (App. D.1)",
        f"A spike: gradient norm > {SPIKE_FACTOR:g} x the median of the up to {SPIKE_WINDOW} "
        f"previous steps' norms (judged from step {SPIKE_WINDOW // 4 + 1}).",
        router_markdown(results),
        results_table(results, "router_gru", ["router_gru", "router_mlp"]),
        "Phase-1 models: " + ", ".join(f"seed {r.seed}: {r.val_loss:.4f}" for r in phase1_rows),
        f"Wall time of this run: {seconds:.0f} s (arms already stored are not retrained)",
    ]
    payload = {
        "scale": scale,
        "settings": asdict(s),
        "seeds": list(seeds),
        "grid": {"K": list(GRID_K), "H": list(GRID_H), "seeds": grid_seeds},
        "spike_rule": {"factor": SPIKE_FACTOR, "window": SPIKE_WINDOW},
        "results": [asdict(r) for r in results],
        "phase1": [asdict(r) for r in phase1_rows],
        "comparisons": comparisons,
        "wall_seconds": seconds,
    }
    write_outputs(out_dir, NAME, payload, "\n\n".join(parts))
    return payload

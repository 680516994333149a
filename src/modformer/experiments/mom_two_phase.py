"""Two-phase training vs MoM from scratch vs MoM-same (MoM paper Table 2, at CPU scale):
`modformer reproduce mom-two-phase`.

All MoM arms are MoM_P K2H6S on chunks ``[1-4-1]`` of the 6-layer d = 128 model of
`mom_vs_vanilla` (router width max(8, d / 4)); P1 / P2 are the scale's phase-1 / phase-2
steps (2:1, as the paper's 20k + 10k). The paper's rows and ours:

- (1) ``mom_scratch_p1``: MoM from scratch for P1 steps;
- (2) ``vanilla_phase1``: vanilla for P1 steps (the phase-1 model);
- (3) ``mom_scratch_all``: MoM from scratch for P1 + P2 steps;
- (4) ``two_phase``: vanilla P1 steps, then MoM P2 steps (shared with mom_vs_vanilla's mom_p);
- (5) ``mom_same``: as (4), but the chunk's modules are tied (one attention and one FFN
  module, the chunk's first layer's) in phase 2;
- (6) ``vanilla_all`` (the row the paper lacks, and the baseline): vanilla trained P1 + P2
  steps with one schedule: equal tokens and parameters (within the routers' 2%) to
  (3), (4), (5).

Every arm of a seed sees the same data order from the seed; tokens are counted over both
phases.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from modformer.experiments.common import ArmResult, run_arm
from modformer.experiments.mom_vs_vanilla import (
    CHUNKS,
    MOM_ARMS,
    SCALES,
    data_dir,
    finish,
    mom_p_arm,
    phase1,
    phase2_arm,
    shared_dir,
    train_and_measure,
)

NAME = "mom-two-phase"
ARM_ORDER = [
    "vanilla_all", "mom_scratch_p1", "vanilla_phase1", "mom_scratch_all", "two_phase",
    "mom_same",
]  # fmt: skip
MATCHED = {
    "vanilla_all": "baseline: vanilla for P1 + P2 steps (one schedule)",
    "mom_scratch_p1": "(1) MoM from scratch, P1 steps: 2/3 of the baseline's tokens",
    "vanilla_phase1": "(2) vanilla P1 steps: 2/3 of the baseline's tokens",
    "mom_scratch_all": "(3) MoM from scratch, P1 + P2 steps: equal tokens, params +~2%",
    "two_phase": "(4) vanilla P1 then MoM P2: equal tokens, params +~2%",
    "mom_same": "(5) as (4) with tied modules in phase 2: equal tokens, ~1/4 of the chunk's params",
}
# The paper's own comparisons, each at equal tokens: title -> (baseline, arms).
PAPER_COMPARISONS = {
    "(1) vs (2): MoM from scratch vs vanilla, P1 steps each": (
        "vanilla_phase1",
        ["mom_scratch_p1"],
    ),
    "(3) and (5) vs (4): two-phase MoM against scratch and MoM-same, P1 + P2 steps": (
        "two_phase",
        ["mom_scratch_all", "mom_same"],
    ),
}


def scratch_mom_model(scale: str) -> dict:
    """Model section of a MoM_P trained from scratch, the converted models' shape."""
    from modformer.convert.mom import phase2_router_dim
    from modformer.models.mom.configuration_mom import parse_mom_name

    s = SCALES[scale]
    K, H, skip = parse_mom_name(MOM_ARMS["mom_p"])
    overrides = {
        "n_embd": s.n_embd, "n_head": s.n_head, "n_positions": max(256, s.block_size),
        "chunks": CHUNKS, "K": K, "H": H, "skip": skip,
        "router_dim": phase2_router_dim(s.n_embd),
    }  # fmt: skip
    return {"arch": "mom", "preset": "tiny", "overrides": overrides}


def with_phase1_tokens(result: ArmResult, arm: str, scale: str) -> ArmResult:
    """A phase-2 result renamed, its steps and tokens counted over both phases."""
    s = SCALES[scale]
    return replace(
        result,
        arm=arm,
        steps=result.steps + s.phase1_steps,
        train_tokens=result.train_tokens + s.phase1_steps * s.batch_size * s.block_size,
    )


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    s = SCALES[scale]
    start = time.perf_counter()
    data = data_dir(out_dir)
    all_steps = s.phase1_steps + s.phase2_steps
    vanilla_model = {
        "arch": "gpt", "preset": "tiny",
        "overrides": {"n_layer": s.n_layer, "n_embd": s.n_embd, "n_head": s.n_head,
                      "n_positions": max(256, s.block_size)},
    }  # fmt: skip
    results: list[ArmResult] = []
    phase1_rows: list[ArmResult] = []
    for seed in seeds:
        for arm, steps, model in (
            ("vanilla_all", all_steps, vanilla_model),
            ("mom_scratch_p1", s.phase1_steps, scratch_mom_model(scale)),
            ("mom_scratch_all", all_steps, scratch_mom_model(scale)),
        ):
            if s.core_only and arm == "mom_scratch_p1":
                continue
            results.append(
                run_arm(
                    out_dir, arm, seed,
                    lambda run, arm=arm, steps=steps, model=model, seed=seed: train_and_measure(
                        arm, seed, s, data, run, steps, **model
                    ),
                )
            )  # fmt: skip
        # The phase-1 model and MoM_P are shared with mom_vs_vanilla (which may be
        # training them at the same time: the shared arms wait on a lock).
        p1 = phase1(out_dir, scale, seed)
        p1_row = run_arm(shared_dir(out_dir, scale), "phase1", seed, None)
        phase1_rows.append(p1_row)
        results.append(replace(p1_row, arm="vanilla_phase1"))
        two_phase = mom_p_arm(out_dir, scale, seed, p1)
        results.append(with_phase1_tokens(two_phase, "two_phase", scale))
        if not s.core_only:
            same = phase2_arm(
                out_dir, "mom_same", seed, scale, p1, mom_name=MOM_ARMS["mom_p"], mom_same=True
            )
            results.append(with_phase1_tokens(same, "mom_same", scale))
        # After every seed, so a stopped run leaves its tables so far.
        payload = finish(
            out_dir, NAME, scale, seeds[: len(phase1_rows)], results, phase1_rows,
            "vanilla_all", ARM_ORDER, MATCHED, start, extra_tables=PAPER_COMPARISONS,
        )  # fmt: skip
    return payload

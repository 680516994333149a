"""Attention vs FFN redundancy (MoM paper Fig. 3, at CPU scale): `modformer reproduce
mom-redundancy`.

The paper converts GPT-2 medium into MoMs whose chunks keep N_A attention and N_F FFN
modules (both <= 4), sets each router's K to its pool's size, and reports each model's
validation loss increase over N_A = N_F = 4. Here every arm is phase 2 of
`mom_vs_vanilla` (its scales, data, recipe and shared phase-1 models) on chunks
``[1-4-1]`` with H = 2 and SKIP (the paper does not give Fig. 3's H; 2 keeps the
full-pool arm, K = 4 at both routers, at twice the vanilla chunk's compute):

- ``A{a}F{f}`` for the (N_A, N_F) of `CELLS`: the chunk's attention pool holds the layers
  ``i * 4 // a`` of its 4 layers, the FFN pool the layers ``i * 4 // f``
  (`convert.mom.spread_layers`), K_attn = a, K_ffn = f. ``A4F4`` is the baseline;
- ``vanilla_cont``: the vanilla model continued for the same steps, for reference.

Every arm continues the phase-1 model of its seed with the same recipe and batches
(equal tokens); the reduced pools have fewer parameters (named in the table).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from modformer.experiments.common import ArmResult, run_arm
from modformer.experiments.mom_vs_vanilla import finish, phase1, phase2_arm, shared_dir

NAME = "mom-redundancy"
H = 2
# (N_A, N_F): the full pool, then the extremes, then the middle of Fig. 3's row N_F = 4
# and column N_A = 4 (the order they are trained in: a stopped run has the extremes).
CELLS = ((4, 4), (1, 4), (4, 1), (2, 4), (4, 2))
BASELINE = "A4F4"


def cell_arm(n_attn: int, n_ffn: int) -> str:
    return f"A{n_attn}F{n_ffn}"


def cell_overrides(n_attn: int, n_ffn: int) -> dict:
    """The MoMConfig fields of a cell: pools of n_attn / n_ffn modules, K = pool size."""
    return dict(
        K=max(n_attn, n_ffn), K_attn=n_attn, K_ffn=n_ffn, H=H, skip=True,
        attn_modules_per_chunk=[n_attn], ffn_modules_per_chunk=[n_ffn],
    )  # fmt: skip


ARM_ORDER = [cell_arm(a, f) for a, f in CELLS] + ["vanilla_cont"]
MATCHED = {
    cell_arm(a, f): (
        "baseline: full pools (4 attention, 4 FFN), K = 4"
        if (a, f) == (4, 4)
        else f"{a} attention / {f} FFN modules, K_attn = {a}, K_ffn = {f}; equal tokens, "
        "fewer parameters"
    )
    for a, f in CELLS
} | {"vanilla_cont": "reference: the vanilla model continued, equal tokens"}


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    start = time.perf_counter()
    results: list[ArmResult] = []
    done: list[int] = []

    def write() -> dict:  # after every arm, so a stopped run leaves its tables so far
        rows = [run_arm(shared_dir(out_dir, scale), "phase1", seed, None) for seed in done]
        return finish(out_dir, NAME, scale, done, results, rows, BASELINE, ARM_ORDER, MATCHED,
                      start)  # fmt: skip

    def write_now(seed: int) -> None:
        if seed not in done:
            done.append(seed)
        write()

    for seed in seeds:
        p1 = phase1(out_dir, scale, seed)
        for n_attn, n_ffn in CELLS:
            results.append(
                phase2_arm(
                    out_dir, cell_arm(n_attn, n_ffn), seed, scale, p1,
                    **cell_overrides(n_attn, n_ffn),
                )
            )  # fmt: skip
            write_now(seed)
        results.append(phase2_arm(out_dir, "vanilla_cont", seed, scale, p1))
        write_now(seed)
    return write()

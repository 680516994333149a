"""Reproduction experiments: one module per claim of the papers, run by
`modformer reproduce NAME` (see docs/results.md for what each measured).

This file only names them (it imports nothing heavy, so `modformer --help` stays fast);
each module exposes ``run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict``,
trains its arms through `modformer.experiments.common.run_arm` (resumable) and writes
``results.json`` and ``results.md`` in ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    module: str
    summary: str


EXPERIMENTS: dict[str, Experiment] = {}

SCALES = ("full", "quick")  # quick: a few steps per arm, to check the plumbing

"""`modformer reproduce NAME`: one of the papers' experiments with seeds and baselines."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from modformer.experiments.common import experiment_dir_name, run_experiment


def run_reproduce(args: argparse.Namespace) -> dict:
    """`modformer reproduce NAME`."""
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2"
        ) from None
    out_dir = (
        Path(args.out_dir)
        if args.out_dir
        else Path("runs") / "reproduce" / experiment_dir_name(args.name, args.scale)
    )
    start = time.perf_counter()
    payload = run_experiment(args.name, out_dir, seeds, args.scale)
    print(f"{args.name}: results in {out_dir}/results.md ({time.perf_counter() - start:.0f} s)")
    return payload

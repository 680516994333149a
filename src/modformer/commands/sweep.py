"""`modformer sweep`: train a grid of configurations and plot their validation loss."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modformer.experiments.sweep import GridAxis, format_results, sweep


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    result = sweep(
        args.base_config,
        args.grid,
        args.out_dir,
        sets=args.set,
        steps=args.steps,
        init_from_vanilla=args.init_from_vanilla,
    )
    axes = [GridAxis(key, values) for key, values in result["grid"].items()]
    print(format_results(axes, result["points"]))
    print(f"\nresults: {Path(args.out_dir) / 'results.csv'}")
    if result["plot"] is not None:
        print(f"plot: {result['plot']}")
    return result

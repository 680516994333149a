"""`modformer plot-curves`: training and validation loss of runs as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from modformer.eval.curves import plot_training_curves


def run_plot(args: argparse.Namespace) -> Path:
    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    out = plot_training_curves(
        args.runs,
        args.out,
        labels=labels,
        x_axis=args.x,
        smoothing=args.smooth,
        log_y=args.log_y,
        title=args.title,
    )
    print(f"wrote {out}")
    return out

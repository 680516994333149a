"""`modformer routing-report`: usage heatmaps, MoM transitions and per-domain expert KL."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from modformer.analysis.routing_report import write_routing_report
from modformer.analysis.usage import UsageError, collect_usage_on_data


def run_routing_report(args: argparse.Namespace) -> dict[str, Any]:
    if args.kl_epsilon <= 0:
        raise UsageError(f"--kl-epsilon must be > 0, got {args.kl_epsilon}")
    stats = collect_usage_on_data(
        args.model,
        args.data,
        split=args.split,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        per_domain=True,
        device=args.device,
    )
    stats.save(Path(args.out_dir) / "usage.json")
    report = write_routing_report(stats, args.out_dir, args.norm, args.kl_epsilon)
    print(f"routing report of {stats.tokens:,} tokens -> {args.out_dir}")
    for name in report["figures"]:
        print(f"  {name}")
    if "kl" in report:
        for kind, table in report["kl"]["mean"].items():
            mean = np.array(table)
            off = mean[~np.eye(len(mean), dtype=bool)]
            print(f"  mean symmetric KL between domains ({kind}): {off.mean():.4f} nats")
    return report

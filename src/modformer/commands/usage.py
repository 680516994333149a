"""`modformer usage`: how often each expert/module is picked, per layer or chunk step."""

from __future__ import annotations

import argparse

from modformer.analysis.usage import UsageStats, collect_usage_on_data, format_usage_table


def run_usage(args: argparse.Namespace) -> UsageStats:
    stats = collect_usage_on_data(
        args.model,
        args.data,
        split=args.split,
        block_size=args.block_size,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        per_domain=args.per_domain,
        device=args.device,
    )
    print(format_usage_table(stats, args.norm))
    if args.out:
        stats.save(args.out)
        print(f"\nwrote {args.out}")
    return stats

"""`modformer forgetting`: the continual-learning experiment once, at one seed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modformer.experiments.forgetting import format_forgetting_table, run_forgetting_experiment


def run_forgetting(args: argparse.Namespace) -> dict[str, Any]:
    result = run_forgetting_experiment(
        args.out_dir,
        data_dir=args.data,
        max_bytes_per_domain=args.max_bytes_per_domain,
        vocab_size=args.vocab_size,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        new_experts=args.new_experts,
        routing_reg_weights=args.reg_weights,
        old_domains=[d for d in args.old_domains.split(",") if d],
        new_domain=args.new_domain,
        preset=args.preset,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        eval_batches=args.eval_batches,
        trajectory_interval=args.trajectory_interval,
        seed=args.seed,
        threads=args.threads,
        progress=args.progress,
    )
    print(format_forgetting_table(result))
    print(f"\nwall time {result['wall_s']:.0f} s; wrote {Path(args.out_dir) / 'forgetting.json'}")
    return result

"""`modformer cost`: parameters, FLOPs per token and peak memory per model."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from transformers import PreTrainedConfig, PreTrainedModel

from modformer.eval.costs import CostRow, cost_table, format_cost_table, parse_config_spec


def run_cost(args: argparse.Namespace) -> list[CostRow]:
    from modformer.models.loading import load_model

    if not args.models and not args.configs:
        raise ValueError("give at least one MODEL directory or --config SPEC (e.g. gpt:small)")
    entries: list[tuple[str, PreTrainedModel | PreTrainedConfig]] = [
        parse_config_spec(spec) for spec in args.configs
    ]
    entries = [(path, load_model(path)) for path in args.models] + entries
    rows = cost_table(
        entries,
        args.batch_size,
        args.seq_len,
        data_dir=args.data,
        device=args.device,
        attention=args.attention,
        max_val_batches=args.max_val_batches,
        seed=args.seed,
    )
    tokens = "the first val batch of " + args.data if args.data else "random token ids"
    print(
        f"inference costs: batch {args.batch_size} x {args.seq_len} tokens on {args.device}, "
        f"{args.attention} attention, FLOPs on {tokens}"
    )
    print(format_cost_table(rows))
    if any(not row.trained for row in rows):
        print(
            "note: --config models are random-init; their routers pick modules at random, "
            "and learned routing changes MoM/ModuleFormer FLOPs and active parameters"
        )
    cache_rows = []
    if args.memory == "cache":
        from modformer.eval.cache_memory import cache_memory_rows, format_cache_memory_table

        cache_rows = cache_memory_rows(entries, args.batch_size, args.seq_len, seed=args.seed)
        print(
            f"\nmemory with a KV cache (MiB, batch {args.batch_size} x {args.seq_len} tokens; "
            "weights not included; measured: one forward with use_cache=True)"
        )
        print(format_cache_memory_table(cache_rows))
    if args.json:
        from modformer.utils import atomic_write_text

        payload = {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "device": str(args.device),
            "attention": args.attention,
            "tokens": "data" if args.data else "random",
            "rows": [asdict(row) for row in rows],
        }
        if cache_rows:
            payload["cache_memory"] = [row.as_dict() for row in cache_rows]
        atomic_write_text(args.json, json.dumps(payload, indent=2))
    return rows

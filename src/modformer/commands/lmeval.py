"""`modformer lm-eval`: lm-evaluation-harness tasks on a saved model, offline."""

from __future__ import annotations

import argparse
import json
from typing import Any

from modformer.eval.lmeval import evaluate_lm_eval, results_summary, write_remote_code


def run_lmeval(args: argparse.Namespace) -> dict[str, Any] | None:
    """`modformer lm-eval`: evaluate MODEL on --tasks (or, with --write-remote-code, only
    prepare MODEL for the plain lm_eval command)."""
    if args.write_remote_code:
        model_dir = write_remote_code(args.model)
        print(
            f"wrote the model code and auto_map into {model_dir}; now run\n"
            f"  lm_eval --model hf --model_args pretrained={model_dir.resolve()},"
            "trust_remote_code=True --tasks ..."
        )
        return None
    if not args.tasks:
        raise ValueError("--tasks is required (or pass --write-remote-code)")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate_lm_eval(
        args.model,
        [name.strip() for name in args.tasks.split(",") if name.strip()],
        include_paths=args.include_path,
        include_default_tasks=not args.no_default_tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        limit=limit,
        seed=args.seed,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    summary = results_summary(results)
    if args.output:
        from modformer.utils import atomic_write_text

        atomic_write_text(args.output, json.dumps(summary, indent=2))
    return summary

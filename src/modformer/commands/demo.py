"""`modformer demo`: the end-to-end demo on the built-in corpus."""

from __future__ import annotations

import argparse
from typing import Any

from modformer.experiments import demo


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    settings = demo.DemoSettings(
        work_dir=args.work_dir,
        stages=[stage.strip() for stage in args.stages.split(",") if stage.strip()],
        steps=args.steps,
        mom_steps=args.mom_steps,
        mom_config=args.mom_config,
        mom_chunks=args.mom_chunks,
        moduleformer_steps=args.moduleformer_steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        vocab_size=args.vocab_size,
        max_bytes_per_domain=args.max_bytes_per_domain,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return demo.run_demo(settings)

"""`modformer prepare`: tokenise a corpus into train/val token files."""

from __future__ import annotations

import argparse
from typing import Any

from modformer.data.prepare import prepare


def run_prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Run `modformer prepare` from parsed arguments and print a summary."""
    meta = prepare(
        args.output_dir,
        inputs=args.inputs,
        domains=args.domains,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_bytes_per_domain=args.max_bytes_per_domain,
        text_field=args.text_field,
        overwrite=args.overwrite,
        domain=args.domain,
        include_python_tests=args.include_python_tests,
        progress=not args.no_progress,
        suffixes=args.suffixes,
    )
    print(
        f"wrote {args.output_dir}: vocab_size {meta['vocab_size']} ({meta['tokenizer']['kind']}), "
        f"{meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} "
        f"val tokens ({meta['dtype']})"
    )
    for name, stats in meta["domains"].items():
        print(
            f"  {name:<16} {stats['documents']:>7,} docs {stats['train_tokens']:>12,} train "
            f"{stats['val_tokens']:>10,} val tokens"
        )
    if meta["skipped"]:
        print(f"  skipped {len(meta['skipped'])} inputs (see 'skipped' in meta.json)")
    return meta

"""`modformer eval`: loss and perplexity of a saved model on prepared data or a text file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modformer.config import ConfigError


def run_eval(args: argparse.Namespace) -> dict:
    from modformer.eval.lm import evaluate_split, evaluate_text_file
    from modformer.models.loading import load_model, load_tokenizer
    from modformer.utils import check_output_path

    if args.block_size < 2:
        raise ConfigError(f"--block-size must be >= 2, got {args.block_size}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_batches is not None and args.max_batches < 1:
        raise ConfigError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.json:
        check_output_path(args.json, "--json file")
        if Path(args.json).exists() and not args.overwrite:
            raise ConfigError(
                f"--json file {args.json} already exists; pass --overwrite to replace it"
            )
    model = load_model(args.model, args.device)
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and args.block_size > n_positions:
        raise ConfigError(
            f"--block-size {args.block_size} exceeds the model's context (n_positions={n_positions})"
        )
    if args.text:
        tokenizer = load_tokenizer(args.model)
        if tokenizer is None:
            raise ConfigError(
                f"{args.model} has no tokenizer.json; evaluate prepared data with --data instead"
            )
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer in {args.model} has {len(tokenizer)} tokens but the model only "
                f"{model.config.vocab_size}; they do not belong together"
            )
        results = {
            "text": evaluate_text_file(
                model, tokenizer, args.text, args.block_size, args.batch_size, args.device
            )
        }
    else:
        domains = args.domains.split(",") if args.domains else None
        results = evaluate_split(
            model,
            args.data,
            args.split,
            args.block_size,
            args.batch_size,
            args.max_batches,
            args.per_domain,
            domains,
            args.device,
        )
    print(f"{'set':<16} {'loss':>8} {'ppl':>10} {'tokens':>10}")
    for name, r in results.items():
        print(f"{name:<16} {r['loss']:>8.4f} {r['ppl']:>10.2f} {r['tokens']:>10,}")
    if args.json:
        from modformer.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2))
    return results

"""`modformer generate`: continue a prompt with a saved model and its tokenizer."""

from __future__ import annotations

import argparse

from modformer.config import ConfigError


def run_generate(args: argparse.Namespace) -> str:
    from modformer.generation import generate_text
    from modformer.models.loading import load_model, load_tokenizer

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model = load_model(args.model, args.device)
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise ConfigError(
            f"{args.model} has no tokenizer.json, so text cannot be encoded or decoded"
        )
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.greedy,
        args.seed,
    )
    print(args.prompt + text)
    return text

"""`modformer export hf MODEL DST`: a saved model as a native transformers directory."""

from __future__ import annotations

import argparse

from modformer.convert.export import export_hf


def run_export(args: argparse.Namespace) -> None:
    from modformer.models.loading import load_model, resolve_model_dir

    src = resolve_model_dir(args.model)
    model = load_model(src, "cpu")
    dst = export_hf(model, args.dst, tokenizer_dir=src)
    print(f"exported {args.model} ({type(model).__name__}) -> {dst}")

"""`modformer finetune`: classification or summarisation from local files."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modformer.eval.downstream import (
    ClassificationTask,
    FinetuneConfig,
    SummarizationTask,
    finetune_classifier,
    finetune_summarizer,
    save_classifier,
    save_model_with_tokenizer,
)
from modformer.models.model_card import Provenance


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and score as `add_finetune_arguments` describes; writes
    ``--out/metrics.json`` (atomically) and returns the metrics."""
    from modformer.models.loading import load_model, load_tokenizer, resolve_model_dir
    from modformer.utils import atomic_write_text

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(
            f"{str(model_dir)!r} has no tokenizer.json; fine-tuning reads text, so save the "
            "model with its tokenizer (as `modformer train` does)"
        )
    cfg = FinetuneConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        max_length=args.max_length,
        eval_batch_size=args.eval_batch_size,
        seed=args.seed,
        device=args.device,
        log_interval=args.log_interval,
    )
    cfg.validate()
    out_dir = Path(args.out)
    model = load_model(model_dir, args.device)

    def provenance(metrics: dict[str, Any]) -> Provenance:
        steps = metrics.get("train_steps")
        return Provenance("finetune", source=str(model_dir), data=str(args.train), steps=steps)

    if args.task == "classify":
        task = ClassificationTask(
            text_columns=tuple(c.strip() for c in args.text_columns.split(",")),
            label_column=args.label_column,
            regression=args.regression,
            labels=[s.strip() for s in args.labels.split(",")] if args.labels else None,
        )
        classifier, metrics = finetune_classifier(
            model, tokenizer, args.train, task, cfg, args.eval, args.dropout
        )
        if args.save_model:
            save_classifier(classifier, task, tokenizer, out_dir, provenance(metrics))
        metrics["labels"] = task.labels
    else:
        task = SummarizationTask(
            document_column=args.document_column,
            summary_column=args.summary_column,
            separator=args.separator,
            max_summary_tokens=args.max_summary_tokens,
        )
        metrics, predictions = finetune_summarizer(
            model, tokenizer, args.train, task, cfg, args.eval
        )
        if args.save_model:
            save_model_with_tokenizer(model, tokenizer, out_dir / "model", provenance(metrics))
        if args.predictions and predictions is not None:
            atomic_write_text(
                out_dir / "predictions.jsonl",
                "".join(json.dumps({"summary": p}) + "\n" for p in predictions),
            )
    metrics.update({"model": str(model_dir), "train_file": str(args.train), "config": asdict(cfg)})
    if args.eval:
        metrics["eval_file"] = str(args.eval)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    _print_metrics(metrics)
    return metrics


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(
        f"trained {metrics['train_steps']} steps: loss {metrics['train_loss_first']:.4f} -> "
        f"{metrics['train_loss_last']:.4f}"
    )
    for name, value in metrics.get("eval", {}).items():
        print(
            f"eval {name:<10} {value:.4f}" if isinstance(value, float) else f"eval {name} {value}"
        )

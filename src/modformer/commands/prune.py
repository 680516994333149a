"""`modformer prune` (remove rarely used experts) and `modformer prune-workflow` (the two
fine-tuning/pruning orders of ModuleFormer sec. 5.3 on chosen domains)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modformer.analysis.usage import UsageStats, check_same_tokenizer
from modformer.experiments.prune_workflows import (
    PAPER_LOAD_CONCENTRATION_WEIGHT,
    check_threshold,
    finetune_then_prune,
    prune_then_finetune,
    save_pruned,
    usage_on_domains,
)
from modformer.surgery.extend import SurgeryError, load_model_dir
from modformer.surgery.prune import format_prune_report, prune_model
from modformer.utils import atomic_write_text


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    check_threshold(args.threshold)  # fail before loading anything
    if args.data:
        check_same_tokenizer(args.model, args.data)
    model = load_model_dir(args.model)
    if args.usage:
        usage = UsageStats.load(args.usage)
    else:
        usage = usage_on_domains(model, args.data, args.split, args.block_size, args.max_batches)
    pruned, report = prune_model(model, usage, args.threshold, args.norm)
    save_pruned(pruned, report, args.out, args.model)
    if args.report:
        atomic_write_text(args.report, json.dumps(report, indent=1))
    print(format_prune_report(report))
    print(f"wrote {args.out}")
    return report


def _check_workflow_arguments(args: argparse.Namespace) -> None:
    if not args.thresholds:
        raise SurgeryError("--thresholds is empty; give at least one, e.g. 0.1,0.3")
    for tau in args.thresholds:
        check_threshold(tau)
    if len(set(args.thresholds)) != len(args.thresholds):
        raise SurgeryError(f"--thresholds has repeats: {args.thresholds}")
    if args.workflow == "prune-then-finetune" and args.load_concentration_weight is not None:
        raise SurgeryError(
            "--load-concentration-weight applies to finetune-then-prune (the loss "
            "concentrates the load before pruning); prune-then-finetune does not use it"
        )
    if args.max_batches is not None and args.max_batches < 1:
        raise SurgeryError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.block_size < 1:
        raise SurgeryError(f"--block-size must be >= 1, got {args.block_size}")
    if args.domains is not None:
        from modformer.data.dataset import TokenDataset

        TokenDataset(args.data, "train", domains=args.domains)  # names unknown domains


def run_prune_workflow(args: argparse.Namespace) -> dict[str, Any]:
    """Writes OUT/summary.json: per threshold, the kept-parameter ratio and the final
    validation loss of the fine-tuning (prune-then-finetune) or the pruning report of the
    one fine-tuned model (finetune-then-prune)."""
    _check_workflow_arguments(args)
    check_same_tokenizer(args.model, args.data)
    out = Path(args.out)
    counting = dict(
        norm=args.norm,
        split=args.split,
        block_size=args.block_size,
        max_batches=args.max_batches,
        domains=args.domains,
    )
    summary: dict[str, Any] = {"workflow": args.workflow, "domains": args.domains, "points": []}
    if args.workflow == "finetune-then-prune":
        weight = args.load_concentration_weight
        weight = PAPER_LOAD_CONCENTRATION_WEIGHT if weight is None else weight
        result = finetune_then_prune(
            args.model, args.data, args.thresholds, out, weight, args.set, **counting
        )
        summary.update(load_concentration_weight=weight, train=result["train"])
        for tau, report in result["prune"].items():
            print(format_prune_report(report))
            summary["points"].append(
                {"threshold": tau, "params_ratio": report["params_ratio"], "report": report}
            )
        print(f"wrote {out}/finetuned and {out}/pruned_tau*")
    else:
        usage = usage_on_domains(
            args.model, args.data, args.split, args.block_size, args.max_batches, args.domains
        )
        for tau in args.thresholds:
            result = prune_then_finetune(
                args.model,
                args.data,
                tau,
                out / f"tau{tau:g}",
                args.set,
                usage=usage,
                **counting,
            )
            print(format_prune_report(result["prune"]))
            summary["points"].append(
                {
                    "threshold": tau,
                    "params_ratio": result["prune"]["params_ratio"],
                    "report": result["prune"],
                    "train": result["train"],
                }
            )
        print(f"wrote {out}/tau*/pruned and {out}/tau*/finetuned")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary

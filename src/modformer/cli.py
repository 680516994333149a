"""The `modformer` command: data, training, evaluation, conversion, surgery and analysis.

Each subcommand is a thin layer over the library; `modformer CMD --help` explains every
option. Building the parser imports no torch or transformers (the argparse definitions are
torch-free and every command imports what it needs when it runs), so `--help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modformer import __version__
from modformer.errors import ModformerError
from modformer.utils import retain_freed_memory

# Every subcommand: (name, module of its run function, its add-arguments function as
# "module:function", the run function, one-line help, description). The run functions
# live in modformer.commands (argparse namespace in, library calls out) and import torch;
# the argument definitions live in the torch-free modformer.cli_args* modules.
MOUNTED: list[tuple[str, str, str, str, str, str]] = [
    (
        "prepare",
        "modformer.commands.prepare",
        "modformer.cli_args_train:add_prepare_arguments",
        "run_prepare",
        "tokenise a corpus into train/val token files",
        "Turn text into memory-mapped token files plus meta.json and a tokenizer. "
        "Without --inputs, the built-in offline corpus is used (Python stdlib sources, "
        "pydoc topics, C headers).",
    ),
    (
        "train",
        "modformer.commands.train",
        "modformer.cli_args_train:add_train_arguments",
        "run_train",
        "train a model (also under torchrun for DDP)",
        "Train a model on prepared data. Settings come from --config (YAML/JSON), "
        "then --set overrides, then the per-setting options below. Launch with "
        "`torchrun --nproc_per_node N -m modformer.cli train ...` for DistributedDataParallel.",
    ),
    (
        "eval",
        "modformer.commands.evaluate",
        "modformer.cli_args_models:add_eval_arguments",
        "run_eval",
        "loss / perplexity of a saved model",
        "Report next-token loss and perplexity on a prepared split (optionally per "
        "domain) or on a UTF-8 text file.",
    ),
    (
        "generate",
        "modformer.commands.generate",
        "modformer.cli_args_models:add_generate_arguments",
        "run_generate",
        "generate text from a saved model",
        "Continue a prompt with a saved model and its tokenizer.",
    ),
    (
        "convert",
        "modformer.commands.convert",
        "modformer.cli_args_models:add_convert_arguments",
        "run_convert",
        "convert checkpoints (gpt2, IBM ModuleFormer, official MoM -> modformer; vanilla -> MoM)",
        "Convert checkpoints. `gpt2` imports a local Hugging Face GPT-2 directory; "
        "`moduleformer` an IBM ModuleFormer / MoLM directory; `mom-official` a checkpoint of "
        "the official MoM code; "
        "`mom` turns a vanilla model into a Mixture-of-Modules model (phase-2 initialisation). "
        "Run `modformer convert KIND --help` for the options of each.",
    ),
    (
        "export",
        "modformer.commands.export",
        "modformer.cli_args:add_export_arguments",
        "run_export",
        "write a saved model as a native transformers directory (GPT-2, JetMoE)",
        "Export a saved model so that plain transformers loads it without modformer: "
        "`modformer export hf MODEL DST` writes GPT models as GPT2LMHeadModel and "
        "JetMoE-style ModuleFormers as JetMoeForCausalLM.",
    ),
    (
        "demo",
        "modformer.commands.demo",
        "modformer.cli_args_train:add_demo_arguments",
        "run_demo",
        "the end-to-end demo on the built-in corpus",
        "Prepare the built-in corpus, train the tiny models, report validation "
        "loss beside a unigram baseline, and generate a sample.",
    ),
    (
        "finetune",
        "modformer.commands.finetune",
        "modformer.cli_args:add_finetune_arguments",
        "run_finetune",
        "fine-tune and score a model on local classification or summarisation data",
        "Fine-tune a saved model on a local GLUE-style file (CSV/TSV/JSONL; single "
        "sentences or pairs; class labels or --regression) or on document/summary pairs, score "
        "it on --eval (accuracy, F1, MCC; Pearson/Spearman; ROUGE-1/2/L) and write "
        "OUT/metrics.json.",
    ),
    (
        "lm-eval",
        "modformer.commands.lmeval",
        "modformer.cli_args_models:add_lmeval_arguments",
        "run_lmeval",
        "run lm-evaluation-harness tasks on a saved model, offline",
        "Evaluate a saved model with lm-evaluation-harness (hf backend) on built-in "
        "or local tasks (e.g. --include-path docs/lm_eval_task); or, with --write-remote-code, "
        "make the model directory loadable by the plain lm_eval command.",
    ),
    (
        "plot-curves",
        "modformer.commands.plot_curves",
        "modformer.cli_args_train:add_plot_arguments",
        "run_plot",
        "plot training and validation loss of runs to a PNG",
        "Draw the training and validation loss of one or more training runs "
        "(their metrics.jsonl) against steps or tokens, one line per run.",
    ),
    (
        "usage",
        "modformer.commands.usage",
        "modformer.cli_args:add_usage_arguments",
        "run_usage",
        "module/expert usage statistics of a ModuleFormer or MoM model",
        "Count how often each expert/module is in a token's top-k on a prepared split "
        "(per layer / chunk step, SKIP last), print a table and optionally write JSON.",
    ),
    (
        "routing-report",
        "modformer.commands.routing_report",
        "modformer.cli_args:add_routing_report_arguments",
        "run_routing_report",
        "routing heatmaps, MoM transitions, per-domain expert KL",
        "Usage heatmaps, MoM step-to-step transitions and per-domain expert "
        "distributions with symmetric KL tables, as PNGs plus report.json.",
    ),
    (
        "sweep",
        "modformer.commands.sweep",
        "modformer.cli_args_train:add_sweep_arguments",
        "run_sweep",
        "train a grid of configurations (e.g. MoM K x H) and plot val loss",
        "Train one run per grid point into OUT_DIR/points/<name>; resumable; writes "
        "results.json/csv and sweep.png.",
    ),
    (
        "cost",
        "modformer.commands.cost",
        "modformer.cli_args:add_cost_arguments",
        "run_cost",
        "params, FLOPs/token, peak memory (and val loss) per model: MoM Table 1",
        "Inference costs of saved models and/or random-init preset configs: total "
        "and active parameters, analytic FLOPs per token counting only the modules each token "
        "runs, measured peak memory, and val loss of trained models with --data. See docs/costs.md.",
    ),
    (
        "prune",
        "modformer.commands.prune",
        "modformer.cli_args:add_prune_arguments",
        "run_prune",
        "remove rarely used experts / modules (ModuleFormer, MoM) and their router rows",
        "Count each expert's (or MoM module's) activation frequency on a data set, "
        "normalise within its layer (max or sum) and remove those below --threshold, with their "
        "router rows. Writes a smaller, loadable model and prints parameters before and after.",
    ),
    (
        "prune-workflow",
        "modformer.commands.prune",
        "modformer.cli_args:add_prune_workflow_arguments",
        "run_prune_workflow",
        "fine-tune then prune, or prune then fine-tune, on chosen domains (ModuleFormer)",
        "The two orders of ModuleFormer sec. 5.3 on --domains of a prepared data set: "
        "finetune-then-prune fine-tunes once with the load-concentration loss and prunes at "
        "every --thresholds value; prune-then-finetune prunes the pretrained model by its usage "
        "there at each threshold and fine-tunes each result. Writes the models and summary.json.",
    ),
    (
        "extend",
        "modformer.commands.extend",
        "modformer.cli_args:add_extend_arguments",
        "run_extend",
        "insert new experts for continual learning, freezing the old ones",
        "Add N fresh experts per layer to a ModuleFormer, extend the router's expert "
        "embedding with A', and freeze the old experts and A, B; train the result with "
        "`modformer train --model.init_from OUT` and the routing regulariser ||A'||^2.",
    ),
    (
        "forgetting",
        "modformer.commands.forgetting",
        "modformer.cli_args:add_forgetting_arguments",
        "run_forgetting",
        "the continual-learning experiment (ModuleFormer Tables 5-6 at CPU scale)",
        "Pretrain without one domain, then learn it by full fine-tuning, by expert "
        "insertion at several routing-regulariser weights, and with a dense model; report old- "
        "and new-domain validation loss before and after, and full fine-tuning's old-domain "
        "loss where its trajectory reaches each insertion run's new-domain loss.",
    ),
    (
        "reproduce",
        "modformer.commands.reproduce",
        "modformer.cli_args:add_reproduce_arguments",
        "run_reproduce",
        "run one of the papers' experiments with seeds and baselines (docs/results.md)",
        "Train every arm of one experiment for each seed on the built-in corpus, evaluate on "
        "the whole validation split, compare each arm with its baseline (paired over seeds: "
        "mean +- sd, difference +- SE) and write results.json and results.md. Resumable.",
    ),
]


def _function(module: str, name: str) -> Callable:
    """`name` in `module`, or the function a "module:function" `name` points to."""
    if ":" in name:
        module, name = name.split(":")
    return getattr(importlib.import_module(module), name)


def _mounted(name: str) -> Callable[[argparse._SubParsersAction], None]:
    """The parser-adding function of one MOUNTED subcommand. Only its argparse definitions
    are imported to build the parser; the module with its run function (and torch) is
    imported when the command runs."""
    entry = next(e for e in MOUNTED if e[0] == name)
    _, module, add, run, help_, description = entry

    def run_command(args: argparse.Namespace) -> Any:
        return _function(module, run)(args)

    def add_parser(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(name, help=help_, description=description)
        _function(module, add)(p)
        add_overwrite_option(name, p)
        p.set_defaults(func=run_command)

    return add_parser


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _mounted("prepare"),
    _mounted("train"),
    _mounted("eval"),
    _mounted("generate"),
    _mounted("convert"),
    _mounted("export"),
    _mounted("finetune"),
    _mounted("lm-eval"),
    _mounted("plot-curves"),
    _mounted("cost"),
    _mounted("usage"),
    _mounted("routing-report"),
    _mounted("sweep"),
    _mounted("prune"),
    _mounted("prune-workflow"),
    _mounted("extend"),
    _mounted("forgetting"),
    _mounted("demo"),
    _mounted("reproduce"),
]


# The output paths of each command, checked before any work starts (so that a path under
# a regular file fails at once, not after training): (argument dest, is a directory).
# `train` checks its out_dir itself, since the library entry point needs it too.
OUTPUT_ARGUMENTS: dict[str, list[tuple[str, bool]]] = {
    "prepare": [("output_dir", True)],
    "eval": [("json", False)],
    "convert": [("dst", True)],
    "export": [("dst", True)],
    "finetune": [("out", True)],
    "lm-eval": [("output", False)],
    "plot-curves": [("out", False)],
    "cost": [("json", False)],
    "usage": [("out", False)],
    "routing-report": [("out_dir", True)],
    "sweep": [("out_dir", True)],
    "prune": [("out", True), ("report", False)],
    "prune-workflow": [("out", True)],
    "extend": [("out", True)],
    "forgetting": [("out_dir", True)],
    "demo": [("work_dir", True)],
    "reproduce": [("out_dir", True)],
}


# Outputs that are results (models, metrics) of the mounted commands: one that exists is
# replaced only with --overwrite, which the CLI adds to these commands. (train, eval,
# convert and prepare have their own --overwrite.)
GUARDED_OUTPUTS: dict[str, list[str]] = {
    "finetune": ["out"],
    "lm-eval": ["output"],
    "cost": ["json"],
    "usage": ["out"],
    "prune": ["out", "report"],
    "prune-workflow": ["out"],
    "extend": ["out"],
    "export": ["dst"],
    "plot-curves": ["out"],
    "routing-report": ["out_dir"],
    "forgetting": ["out_dir"],
}


def add_overwrite_option(name: str, parser: argparse.ArgumentParser) -> None:
    if name in GUARDED_OUTPUTS:
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the results of an earlier run at the output path(s); without it "
            "an existing output is refused",
        )


def _flag(command: str, dest: str) -> str:
    positional = dest in ("dst", "output_dir") or (
        dest == "out" and command in ("prune", "prune-workflow", "extend")
    )
    return dest.upper() if positional else "--" + dest.replace("_", "-")


def check_arguments(args: argparse.Namespace) -> None:
    """Checks every command shares, before any work: its output paths can be written and
    its --device exists on this machine."""
    from modformer.utils import OutputPathError, check_output_path

    device = getattr(args, "device", None)
    if isinstance(device, str):
        from modformer.devices import resolve_device

        resolve_device(device)
    for dest, is_dir in OUTPUT_ARGUMENTS.get(args.command, []):
        value = getattr(args, dest, None)
        if isinstance(value, str) and value:
            check_output_path(value, _flag(args.command, dest), directory=is_dir)
    if args.command == "convert":
        from modformer.commands.convert import check_model_destination

        check_model_destination(args.dst, args.overwrite)
    for dest in GUARDED_OUTPUTS.get(args.command, []):
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value or getattr(args, "overwrite", False):
            continue
        path = Path(value)
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            raise OutputPathError(
                f"{_flag(args.command, dest)} {value} already holds earlier results; pass "
                "--overwrite to replace them, or choose another path"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modformer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--version", action="version", version=f"modformer {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message says what is wrong and how to fix it (imported only on the
    error path: the checkpoint module imports torch)."""
    from huggingface_hub.errors import StrictDataclassError

    return (ValueError, FileNotFoundError, ModformerError, StrictDataclassError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    retain_freed_memory()  # CPU training speed; see its docstring
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars add noise to our own progress output
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from modformer.invocation import cli_command

    try:
        check_arguments(args)
        with cli_command(sys.argv[1:] if argv is None else argv):  # for the model cards
            args.func(args)
    except Exception as e:
        if args.verbose:
            raise
        if isinstance(e, _user_error_types()):
            # Our errors carry the problem and the fix; a traceback would bury them.
            from huggingface_hub.errors import StrictDataclassError

            # `@strict` configs wrap the validator's ValueError: show the validator's message.
            message = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        else:
            # Out of memory and disk full are facts about the machine, not bugs: one line.
            # Anything else is a bug and keeps its traceback.
            message = resource_error_message(e)
            if message is None:
                raise
        print(f"modformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def resource_error_message(e: BaseException) -> str | None:
    """One line for out-of-memory and file-system errors; None for anything else (a bug,
    which keeps its traceback)."""
    import errno

    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    ):
        return (
            "out of memory; lower the batch size (or block size / model size), or use a "
            "machine with more memory"
        )
    if not isinstance(e, OSError):
        return None
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space and run again"
    if e.errno is not None:
        return f"{e.strerror or e}{where}; check the path and its permissions"
    return None


if __name__ == "__main__":
    sys.exit(main())

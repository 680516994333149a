"""Argument definitions of the data, training and experiment-driver commands: `prepare`,
`train`, `plot-curves`, `sweep` and `demo`.

Torch-free like `modformer.cli_args` (building the parser imports neither torch nor
transformers). `train`'s options come from the `TrainConfig` dataclass: every field is a
`--section.field` option with the field's help, and `collect_cli_overrides` turns the ones
the user gave back into a nested dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from modformer.config import field_types, is_dataclass_type, parse_override
from modformer.data.corpus import BUILTIN_DOMAINS, DEFAULT_MAX_BYTES_PER_DOMAIN, USER_SUFFIXES
from modformer.data.prepare import DEFAULT_SEED, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE
from modformer.eval.curves import X_AXES
from modformer.experiments.demo import STAGES, DemoSettings
from modformer.train.config import TrainConfig


def _comma_separated(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            "expected a comma-separated list, e.g. python,prose or .py,.md"
        )
    return names


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `modformer prepare`."""
    parser.add_argument(
        "output_dir",
        help="directory to create with train.bin, val.bin, meta.json and tokenizer/",
    )
    parser.add_argument(
        "--inputs",
        nargs="+",
        metavar="[NAME=]PATH",
        help="your own text: files (.jsonl: one document per line; anything else: one "
        "document per file), globs (quote them; ** recurses, e.g. code='src/**/*.py') or "
        "directories (searched recursively for --suffixes). NAME=PATH puts the files in "
        "domain NAME; otherwise the domain is --domain, the directory name, or the file name "
        "without extension. Without --inputs the built-in corpus is used.",
    )
    parser.add_argument(
        "--suffixes",
        type=_comma_separated,
        default=list(USER_SUFFIXES),
        metavar="LIST",
        help="comma-separated file endings a directory input contributes, e.g. .py,.md "
        f"(default: {','.join(USER_SUFFIXES)})",
    )
    parser.add_argument(
        "--domain",
        metavar="NAME",
        help="domain name for every input given without NAME=",
    )
    parser.add_argument(
        "--domains",
        type=_comma_separated,
        metavar="LIST",
        help=f"comma-separated built-in domains to include ({', '.join(BUILTIN_DOMAINS)}); "
        "default: all of them without --inputs, none with --inputs",
    )
    parser.add_argument(
        "--tokenizer",
        default="bpe",
        help="'bpe' trains a byte-level BPE on the corpus; 'byte' uses raw UTF-8 bytes "
        "(257 tokens); a path loads a local Hugging Face tokenizer directory or "
        "tokenizer.json (nothing is downloaded). Default: bpe",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"vocabulary size of the trained BPE, end-of-text token included (at least 257; "
        f"ignored for byte and loaded tokenizers). Default: {DEFAULT_VOCAB_SIZE}",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="share of each domain's text held out for validation, in (0, 0.5], as whole "
        "documents (at least one per domain); a single-document domain is split by "
        "position. Default: %(default)s",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the train/val split. Default: %(default)s",
    )
    parser.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=DEFAULT_MAX_BYTES_PER_DOMAIN,
        help="cap on the text read for each built-in domain, in bytes (your own inputs are "
        "read whole). Default: %(default)s",
    )
    parser.add_argument(
        "--include-python-tests",
        action="store_true",
        help="include the standard library's test suites in the built-in python domain",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        help="JSON field that holds the document text in .jsonl inputs. Default: %(default)s",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT_DIR if it holds an earlier prepare output",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="do not show progress bars",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file with the settings below, by section")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one setting, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in out_dir (same settings required)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in out_dir (final model, metrics, "
        "checkpoints); without it such an out_dir is refused",
    )
    add_dataclass_arguments(parser, TrainConfig)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add `--section.field` options for every (nested) field, with its help and default.

    Options default to None (= not given) so that only what the user typed overrides the
    config file.
    """
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        name = f"{prefix}{f.name}"
        if is_dataclass_type(tp):
            group = parser.add_argument_group(f"{name} settings")
            add_dataclass_arguments(group, tp, prefix=f"{name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        parser.add_argument(
            f"--{name}",
            dest=name,
            default=None,
            metavar=_metavar(tp),
            help=f"{help_text} (default: {default!r})",
        )


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        return "A,B,..."
    if origin is dict or tp is dict:
        return "YAML"
    return getattr(tp, "__name__", "VALUE").upper()


def collect_cli_overrides(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The `--section.field` values the user actually gave, as a nested dict."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        name = f"{prefix}{f.name}"
        if is_dataclass_type(tp):
            sub = collect_cli_overrides(args, tp, prefix=f"{name}.")
            if sub:
                out[f.name] = sub
            continue
        value = getattr(args, name, None)
        if value is not None:
            out[f.name] = parse_override(f"x={value}")[1]
    return out


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="training out_dirs or metrics.jsonl files"
    )
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", help="comma-separated legend names, one per run")
    parser.add_argument(
        "--x", choices=X_AXES, default="step", help="x axis: step or tokens (default: step)"
    )
    parser.add_argument(
        "--smooth", type=float, default=0.0, help="EMA smoothing of the training loss, in [0, 1)"
    )
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    parser.add_argument("--title", help="figure title")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-config", help="YAML/JSON training configuration shared by every point"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a base setting for every point, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="SECTION.FIELD=V1,V2,...",
        help="a grid axis, e.g. --grid model.overrides.K=1,2,3,4 (repeatable; the grid is "
        "every combination)",
    )
    parser.add_argument("--out-dir", required=True, help="sweep directory (points/, results)")
    parser.add_argument(
        "--steps", type=int, help="max_steps of every point (default: the config's)"
    )
    parser.add_argument(
        "--init-from-vanilla",
        metavar="DIR",
        help="phase-2 MoM sweep: convert this trained vanilla model per point (K/H/skip and "
        "chunks from model.overrides) and train from it",
    )


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()  # the library's defaults, shown in the help
    p.add_argument(
        "--work-dir",
        default=defaults.work_dir,
        help=f"where data, runs and results go (default: {defaults.work_dir})",
    )
    p.add_argument(
        "--stages",
        default=",".join(defaults.stages),
        help=f"comma-separated stages to run, from {', '.join(STAGES)} (default: all)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help=f"training steps of the vanilla model (default: {defaults.steps})",
    )
    p.add_argument(
        "--mom-steps",
        type=int,
        default=defaults.mom_steps,
        help=f"phase-2 steps of MoM and of the continued vanilla model (default: {defaults.mom_steps})",
    )
    p.add_argument(
        "--mom-config",
        default=defaults.mom_config,
        help=f"MoM K/H/SKIP name for phase 2 (default: {defaults.mom_config})",
    )
    p.add_argument(
        "--mom-chunks",
        default=defaults.mom_chunks,
        help=f"chunk string over the tiny model's 4 layers (default: {defaults.mom_chunks})",
    )
    p.add_argument(
        "--moduleformer-steps",
        type=int,
        default=defaults.moduleformer_steps,
        help=f"training steps of the ModuleFormer comparison (default: {defaults.moduleformer_steps})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"sequences per step (default: {defaults.batch_size})",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=defaults.block_size,
        help=f"tokens per sequence (default: {defaults.block_size})",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=defaults.vocab_size,
        help=f"BPE vocabulary size (default: {defaults.vocab_size})",
    )
    p.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=defaults.max_bytes_per_domain,
        help="bytes of text taken from each built-in domain "
        f"(default: {defaults.max_bytes_per_domain / 1e6:g} MB)",
    )
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help=f"random seed (default: {defaults.seed})"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

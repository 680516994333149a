"""The `modformer` command: data, training, evaluation, conversion, surgery and analysis.

Each subcommand is a thin layer over the library; `modformer CMD --help` explains every
option. Building the parser imports no torch or transformers (the argparse definitions are
torch-free and every command imports what it needs when it runs), so `--help` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modformer import __version__
from modformer.config import ConfigError
from modformer.errors import ModformerError
from modformer.utils import retain_freed_memory


def _train(sub: argparse._SubParsersAction) -> None:
    from modformer.train.config import add_train_arguments

    p = sub.add_parser(
        "train",
        help="train a model (also under torchrun for DDP)",
        description="Train a model on prepared data. Settings come from --config (YAML/JSON), "
        "then --set overrides, then the per-setting options below. Launch with "
        "`torchrun --nproc_per_node N -m modformer.cli train ...` for DistributedDataParallel.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> dict:
    from modformer.train.config import train_config_from_args
    from modformer.train.trainer import train

    cfg = train_config_from_args(args)
    final = train(cfg, resume=args.resume, overwrite=args.overwrite)
    # Under torchrun every rank returns; one line is enough (RANK is torchrun's).
    if "val_loss" in final and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"final val loss {final['val_loss']:.4f}  ppl {final['val_ppl']:.2f}  -> {cfg.out_dir}/model"
        )
    return final


def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="loss / perplexity of a saved model",
        description="Report next-token loss and perplexity on a prepared split (optionally per "
        "domain) or on a UTF-8 text file.",
    )
    p.add_argument("model", help="model directory or training out_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prepared data directory (output of `modformer prepare`)")
    src.add_argument("--text", help="a UTF-8 text file, tokenised with the model's tokenizer")
    p.add_argument(
        "--split", default="val", choices=["train", "val"], help="split of --data (default: val)"
    )
    p.add_argument("--domains", help="comma-separated domains of --data to restrict to")
    p.add_argument("--per-domain", action="store_true", help="also report each domain of --data")
    p.add_argument("--block-size", type=int, default=128, help="tokens per window (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run_eval)


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


def _generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a saved model",
        description="Continue a prompt with a saved model and its tokenizer.",
    )
    p.add_argument("model", help="model directory or training out_dir")
    p.add_argument(
        "--prompt", default="", help="text to continue (default: empty, start of a document)"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)"
    )
    p.add_argument(
        "--top-k", type=int, default=50, help="sample from the k most likely tokens (default: 50)"
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    p.set_defaults(func=run_generate)


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


def _convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints (gpt2, IBM ModuleFormer, official MoM -> modformer; "
        "vanilla -> MoM)",
        description="Convert checkpoints. `gpt2` imports a local Hugging Face GPT-2 directory; "
        "`moduleformer` an IBM ModuleFormer / MoLM directory; `mom-official` a checkpoint of "
        "the official MoM code; "
        "`mom` turns a vanilla model into a Mixture-of-Modules model (phase-2 initialisation). "
        "Run `modformer convert KIND --help` for the options of each.",
    )
    conv = p.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    g = conv.add_parser(
        "gpt2",
        help="import a local Hugging Face GPT-2 directory",
        description="Import a local HF GPT-2 directory (config.json + model.safetensors) into a "
        "modformer GPT model directory; tokenizer files are copied along.",
    )
    g.add_argument("src", help="local Hugging Face GPT-2 directory")
    g.add_argument("dst", help="output model directory")
    g.set_defaults(func=run_convert_gpt2)
    ibm = conv.add_parser(
        "moduleformer",
        help="import a local IBM ModuleFormer / MoLM directory (github.com/IBM/ModuleFormer)",
        description="Import a local directory written by IBM's ModuleFormer code (model_type "
        "'moduleformer': config.json + safetensors or pytorch_model.bin, read with "
        "weights_only) into a modformer ModuleFormer directory with the same logits; tokenizer "
        "files are copied along. IBM's aux_loss_weight is multiplied by 2 * n_layer (IBM sums "
        "the per-router losses, modformer averages them).",
    )
    ibm.add_argument("src", help="local IBM ModuleFormer / MoLM directory")
    ibm.add_argument("dst", help="output model directory")
    ibm.add_argument(
        "--history-length",
        type=int,
        default=-1,
        help="keys/values the imported model remembers across segments in Transformer-XL "
        "training (default: -1 = unbounded, as IBM's code)",
    )
    ibm.add_argument(
        "--drop-training-options",
        action="store_true",
        help="import although config.json sets training-only options modformer lacks "
        "(sample_topk, moe_pdrop, embd_pdrop != resid_pdrop); they are left out",
    )
    ibm.set_defaults(func=run_convert_moduleformer)
    j = conv.add_parser(
        "jetmoe",
        help="import a local JetMoeForCausalLM directory as a ModuleFormer",
        description="Import a local transformers JetMoE directory (config.json + safetensors) "
        "into a ModuleFormer with JetMoE's options (RMSNorm, SwiGLU experts, linear router, "
        "RoPE softmax attention); tokenizer files are copied along. `modformer export hf` "
        "writes it back.",
    )
    j.add_argument("src", help="local JetMoeForCausalLM directory")
    j.add_argument("dst", help="output model directory")
    j.set_defaults(func=run_convert_jetmoe)
    m = conv.add_parser(
        "mom",
        help="phase-2 initialisation: a vanilla model's layers become a MoM module pool",
        description="Turn a vanilla model (a modformer GPT directory, a training out_dir or a "
        "local HF GPT-2 directory) into a Mixture-of-Modules model: layer l becomes module l of "
        "the chunk covering l, routers start fresh. Then train it with `modformer train "
        "--model.init_from DST`.",
    )
    m.add_argument("--from", dest="src", required=True, help="vanilla model directory")
    m.add_argument(
        "--chunks",
        help="chunk string such as '[1-1-4-1-1]' covering every layer (default: the preset chunking for that depth)",
    )
    m.add_argument(
        "--config", dest="mom_name", required=True, help="K, H and SKIP as a name such as K2H6S"
    )
    m.add_argument(
        "--router", choices=["gru", "mlp"], default="gru", help="router type (default: gru)"
    )
    m.add_argument(
        "--policy",
        default="learned",
        help="assembly policy: learned (default), vanilla, layer_skip, early_exit, parameter_sharing, moe, moe_share",
    )
    m.add_argument(
        "--mom-same",
        action="store_true",
        help="MoM-same ablation: all modules of a chunk identical",
    )
    m.add_argument(
        "--router-dim",
        type=int,
        help="router width (GRU state / MLP hidden size); default max(8, n_embd // 4), which "
        "keeps the routers' parameters small beside the layers they route",
    )
    m.add_argument(
        "--share-map",
        help="policy parameter_sharing: the module each step uses, as H comma-separated "
        "indices, e.g. '0,0,1,1'",
    )
    m.add_argument("dst", help="output model directory")
    m.set_defaults(func=run_convert_mom)
    o = conv.add_parser(
        "mom-official",
        help="import a checkpoint of the official MoM code (gzhch/Mixture-of-Modules)",
        description="Import a local directory saved by the official Mixture-of-Modules code "
        "(config.json with model_type gpt2-mot, and model.safetensors or pytorch_model.bin) into "
        "a modformer MoM model directory. Pickles load with torch.load(weights_only=True); a "
        "file that needs code to unpickle is refused. Tokenizer files are copied along.",
    )
    o.add_argument("src", help="local directory of an official GPT2MoTLMHeadModel")
    o.add_argument("dst", help="output model directory")
    o.set_defaults(func=run_convert_mom_official)

    for kind in conv.choices.values():  # no import replaces a model silently
        kind.add_argument("--overwrite", action="store_true", help="replace an existing DST model")


def check_model_destination(dst: str, overwrite: bool) -> None:
    """Before any work: `dst` can be written, and an existing model there is replaced only
    with --overwrite (and a non-model directory never)."""
    from modformer.utils import check_output_path

    path = check_output_path(dst, "output directory", directory=True)
    if path.is_dir() and any(path.iterdir()):
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"output directory {dst} is not empty and holds no model; choose another one"
            )
        if not overwrite:
            raise ConfigError(f"{dst} already holds a model; pass --overwrite to replace it")


def run_convert_gpt2(args: argparse.Namespace) -> None:
    from modformer.convert.gpt2 import convert_gpt2

    model = convert_gpt2(args.src, args.dst)
    n = model.num_parameters()
    print(f"converted {args.src} -> {args.dst} ({n:,} parameters)")


def run_convert_moduleformer(args: argparse.Namespace) -> None:
    from modformer.convert.moduleformer import convert_moduleformer

    model = convert_moduleformer(
        args.src, args.dst, args.drop_training_options, args.history_length
    )
    print(
        f"converted {args.src} -> {args.dst} ({model.total_parameters():,} parameters, "
        f"{model.active_parameters():,} active per token)"
    )


def run_convert_jetmoe(args: argparse.Namespace) -> None:
    from modformer.convert.jetmoe import convert_jetmoe

    model = convert_jetmoe(args.src, args.dst)
    n = model.num_parameters()
    print(f"converted {args.src} -> {args.dst} (JetMoE as ModuleFormer, {n:,} parameters)")


def run_convert_mom(args: argparse.Namespace) -> None:
    from modformer.convert.mom import mom_from_vanilla
    from modformer.models.io import atomic_save_model
    from modformer.models.loading import resolve_model_dir
    from modformer.models.model_card import Provenance

    src = resolve_model_dir(args.src)  # a model dir, a training out_dir or a HF GPT-2 dir
    options = {}
    if args.router_dim is not None:
        options["router_dim"] = args.router_dim
    if args.share_map is not None:
        try:
            options["share_map"] = [int(m) for m in args.share_map.split(",")]
        except ValueError:
            raise ConfigError(
                f"--share-map {args.share_map!r}: expected comma-separated module indices, "
                "e.g. '0,0,1,1'"
            ) from None
    model = mom_from_vanilla(
        src,
        chunks=args.chunks,
        mom_name=args.mom_name,
        router=args.router,
        policy=args.policy,
        mom_same=args.mom_same,
        **options,
    )
    atomic_save_model(model, args.dst, Path(src), Provenance(method="convert", source=str(src)))
    n = model.num_parameters()
    print(
        f"converted {args.src} -> {args.dst}: MoM {model.config.mom_name} chunks {model.config.chunks} ({n:,} parameters)"
    )


def run_convert_mom_official(args: argparse.Namespace) -> None:
    from modformer.convert.mom_official import convert_mom_official

    model = convert_mom_official(args.src, args.dst)
    n = model.num_parameters()
    print(
        f"converted {args.src} -> {args.dst}: MoM {model.config.mom_name} chunks {model.config.chunks} ({n:,} parameters)"
    )


# Subcommands that live in their own module as `add_*_arguments(parser)` + `run_*(args)`:
# (name, module, add-arguments function, run function, one-line help, description).
# The add-arguments function is looked up in `module`, or given as "other.module:function"
# when `module` imports torch (its argparse definitions then live in modformer.cli_args).
MOUNTED: list[tuple[str, str, str, str, str, str]] = [
    (
        "prepare",
        "modformer.data.prepare",
        "add_prepare_arguments",
        "run_prepare",
        "tokenise a corpus into train/val token files",
        "Turn text into memory-mapped token files plus meta.json and a tokenizer. "
        "Without --inputs, the built-in offline corpus is used (Python stdlib sources, "
        "pydoc topics, C headers).",
    ),
    (
        "export",
        "modformer.convert.export",
        "modformer.cli_args:add_export_arguments",
        "run_export",
        "write a saved model as a native transformers directory (GPT-2, JetMoE)",
        "Export a saved model so that plain transformers loads it without modformer: "
        "`modformer export hf MODEL DST` writes GPT models as GPT2LMHeadModel and "
        "JetMoE-style ModuleFormers as JetMoeForCausalLM.",
    ),
    (
        "demo",
        "modformer.demo",
        "add_demo_arguments",
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
        "modformer.eval.lmeval",
        "add_lmeval_arguments",
        "run_lmeval",
        "run lm-evaluation-harness tasks on a saved model, offline",
        "Evaluate a saved model with lm-evaluation-harness (hf backend) on built-in "
        "or local tasks (e.g. --include-path docs/lm_eval_task); or, with --write-remote-code, "
        "make the model directory loadable by the plain lm_eval command.",
    ),
    (
        "plot-curves",
        "modformer.eval.curves",
        "add_plot_arguments",
        "run_plot",
        "plot training and validation loss of runs to a PNG",
        "Draw the training and validation loss of one or more training runs "
        "(their metrics.jsonl) against steps or tokens, one line per run.",
    ),
    (
        "usage",
        "modformer.analysis.usage",
        "modformer.cli_args:add_usage_arguments",
        "run_usage",
        "module/expert usage statistics of a ModuleFormer or MoM model",
        "Count how often each expert/module is in a token's top-k on a prepared split "
        "(per layer / chunk step, SKIP last), print a table and optionally write JSON.",
    ),
    (
        "routing-report",
        "modformer.analysis.routing_report",
        "modformer.cli_args:add_routing_report_arguments",
        "run_routing_report",
        "routing heatmaps, MoM transitions, per-domain expert KL",
        "Usage heatmaps, MoM step-to-step transitions and per-domain expert "
        "distributions with symmetric KL tables, as PNGs plus report.json.",
    ),
    (
        "sweep",
        "modformer.analysis.sweep",
        "add_sweep_arguments",
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
        "modformer.surgery.extend",
        "modformer.cli_args:add_extend_arguments",
        "run_extend",
        "insert new experts for continual learning, freezing the old ones",
        "Add N fresh experts per layer to a ModuleFormer, extend the router's expert "
        "embedding with A', and freeze the old experts and A, B; train the result with "
        "`modformer train --model.init_from OUT` and the routing regulariser ||A'||^2.",
    ),
    (
        "forgetting",
        "modformer.surgery.forgetting",
        "modformer.cli_args:add_forgetting_arguments",
        "run_forgetting",
        "the continual-learning experiment (ModuleFormer Tables 5-6 at CPU scale)",
        "Pretrain without one domain, then learn it by full fine-tuning, by expert "
        "insertion at several routing-regulariser weights, and with a dense model; report old- "
        "and new-domain validation loss before and after.",
    ),
    (
        "reproduce",
        "modformer.experiments.common",
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
    _train,
    _eval,
    _generate,
    _convert,
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

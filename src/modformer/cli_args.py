"""Argument definitions of the fine-tuning, cost, analysis, surgery, export and
reproduction commands (`modformer.cli_args_models` and `modformer.cli_args_train` hold
the others; `modformer.commands` the code that runs each command).

They live here, torch-free, so that `modformer SUB --help` (and building the whole
parser) starts in a fraction of a second. The choices and defaults shown in the help come
from `modformer.defaults`, which the library modules that check them import too.
"""

from __future__ import annotations

import argparse

from modformer.defaults import (
    ATTENTION_MODES,
    DEFAULT_KL_EPSILON,
    DEFAULT_NEW_DOMAIN,
    DEFAULT_OLD_DOMAINS,
    DEFAULT_REG_WEIGHTS,
    NORMS,
    SPEC_SYNTAX,
)
from modformer.eval.finetune_config import DEFAULT_SEPARATOR, FinetuneConfig


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.1,1, got {text!r}"
        ) from None


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (with its tokenizer) or training out_dir")
    parser.add_argument(
        "--task",
        required=True,
        choices=["classify", "summarize"],
        help="classify: a classification head on the last token; summarize: conditional generation",
    )
    parser.add_argument("--train", required=True, help="training file (.csv, .tsv, .jsonl)")
    parser.add_argument("--eval", help="labelled evaluation file (same format and columns)")
    parser.add_argument("--out", required=True, help="output directory for metrics.json")
    parser.add_argument(
        "--save-model",
        action="store_true",
        help="also save the fine-tuned model in --out/model (classify: its "
        "...ForSequenceClassification, for AutoModelForSequenceClassification)",
    )
    group = parser.add_argument_group("classify")
    group.add_argument(
        "--text-columns",
        default="sentence",
        help="one text column, or two comma-separated for sentence pairs (default: sentence)",
    )
    group.add_argument("--label-column", default="label", help="label column (default: label)")
    group.add_argument(
        "--regression", action="store_true", help="float labels (e.g. STS-B): one output, MSE"
    )
    group.add_argument(
        "--labels",
        help="comma-separated class names in index order (default: sorted training labels)",
    )
    group.add_argument("--dropout", type=float, default=0.1, help="head dropout (default: 0.1)")
    group = parser.add_argument_group("summarize")
    group.add_argument(
        "--document-column",
        default="document",
        help="column of the text to summarise (default: document)",
    )
    group.add_argument(
        "--summary-column",
        default="summary",
        help="column of the reference summary (default: summary)",
    )
    group.add_argument(
        "--separator",
        default=DEFAULT_SEPARATOR,
        help="text between document and summary (default: '\\nTL;DR:\\n')",
    )
    group.add_argument(
        "--max-summary-tokens",
        type=int,
        default=64,
        help="summary tokens trained on and generated at most (default: 64)",
    )
    group.add_argument(
        "--predictions", action="store_true", help="write the eval summaries to --out"
    )
    group = parser.add_argument_group("optimisation")
    defaults = FinetuneConfig()
    group.add_argument(
        "--epochs",
        type=float,
        default=defaults.epochs,
        help=f"passes over the training file (default: {defaults.epochs:g})",
    )
    group.add_argument("--max-steps", type=int, help="steps to train (overrides --epochs)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"training examples per step (default: {defaults.batch_size})",
    )
    group.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help=f"peak learning rate, after warm-up, decayed linearly to 0 (default: {defaults.lr:g})",
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help=f"AdamW weight decay of >= 2-D weights (default: {defaults.weight_decay:g})",
    )
    group.add_argument(
        "--warmup-steps",
        type=int,
        default=defaults.warmup_steps,
        help=f"linear learning-rate warm-up steps (default: {defaults.warmup_steps})",
    )
    group.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help=f"clip the gradient norm to this; 0 disables clipping (default: {defaults.grad_clip:g})",
    )
    group.add_argument(
        "--max-length", type=int, help="tokens per input (default: the model's n_positions)"
    )
    group.add_argument(
        "--eval-batch-size",
        type=int,
        default=defaults.eval_batch_size,
        help=f"evaluation examples per batch (default: {defaults.eval_batch_size})",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help=f"seed of the head, dropout and shuffling (default: {defaults.seed})",
    )
    group.add_argument("--device", default=defaults.device, help="cpu, cuda, ... (default: cpu)")
    group.add_argument(
        "--log-interval",
        type=int,
        default=defaults.log_interval,
        help=f"log the training loss every this many steps (default: {defaults.log_interval})",
    )


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or training out_dir (ModuleFormer or MoM)")
    parser.add_argument("data", help="prepared data directory (output of `modformer prepare`)")
    parser.add_argument(
        "--split", default="val", choices=["train", "val"], help="split to count on (default: val)"
    )
    parser.add_argument(
        "--norm",
        default="max",
        choices=list(NORMS),
        help="normalise each layer's counts by their max (default) or their sum",
    )
    parser.add_argument(
        "--per-domain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also count each domain separately (default: on)",
    )
    parser.add_argument("--max-batches", type=int, help="batches per domain (default: all)")
    parser.add_argument(
        "--block-size", type=int, default=128, help="tokens per window (default: 128)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--out", help="write the statistics to this JSON file")


def add_routing_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or training out_dir (ModuleFormer or MoM)")
    parser.add_argument("data", help="prepared data directory (output of `modformer prepare`)")
    parser.add_argument("--out-dir", required=True, help="where the PNGs and report.json go")
    parser.add_argument(
        "--split", default="val", choices=["train", "val"], help="split to count on (default: val)"
    )
    parser.add_argument(
        "--norm",
        default="max",
        choices=list(NORMS),
        help="normalise usage rows by their max (default) or sum",
    )
    parser.add_argument(
        "--kl-epsilon",
        type=float,
        default=DEFAULT_KL_EPSILON,
        help=f"smoothing added to each domain distribution before the KL (default: {DEFAULT_KL_EPSILON:g})",
    )
    parser.add_argument("--max-batches", type=int, help="batches per domain (default: all)")
    parser.add_argument(
        "--block-size", type=int, default=128, help="tokens per window (default: 128)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="saved model directories or training out_dirs (trained models; listed first)",
    )
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"a random-init model from a preset, {SPEC_SYNTAX}; repeatable, e.g. "
        "--config gpt:small --config mom:small:K3H1S --config MoE=mom:small:K2H4:policy=moe "
        "--config moduleformer:tiny. Untrained routers pick at random, so learned routing "
        "changes MoM/ModuleFormer FLOPs: pass trained model directories for final figures",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="sequences (default: 1)")
    parser.add_argument(
        "--seq-len", type=int, default=256, help="tokens per sequence (default: 256)"
    )
    parser.add_argument(
        "--data",
        help="prepared data directory: FLOPs are counted on its first val batch (routing on "
        "real text) and trained models get their val loss (windows of --seq-len)",
    )
    parser.add_argument(
        "--max-val-batches", type=int, help="val batches for the loss (default: all)"
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        default="causal",
        help="attention scores: keys each query can see (causal, default) or the full "
        "T x T of dense kernels (dense, as FlopCounterMode/DeepSpeed count)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="init and token seed (default: 0)")
    parser.add_argument(
        "--memory",
        choices=["forward", "cache"],
        default="forward",
        help="forward (default): measured peak of a no-cache forward only; cache: also the "
        "activation memory with a KV cache as MoM Table 1 measures it (logits + per-layer "
        "keys/values, MoM key flags and router state) at --batch-size x --seq-len, by "
        "formula and checked against the tensors of one forward with a cache",
    )
    parser.add_argument("--json", help="also write the table to this JSON file")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ModuleFormer or MoM model directory or training out_dir")
    parser.add_argument("out", help="directory for the pruned model (and prune_report.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="prepared data directory to count module usage on")
    source.add_argument("--usage", help="usage statistics JSON written by `modformer usage`")
    parser.add_argument(
        "--threshold",
        type=float,
        required=True,
        help="remove modules whose normalised activation frequency is below this (0..1)",
    )
    parser.add_argument(
        "--norm",
        choices=list(NORMS),
        default="max",
        help="normalise each layer's frequencies by their max (default, as the paper) or sum",
    )
    parser.add_argument(
        "--split", default="val", choices=["train", "val"], help="split of --data (default: val)"
    )
    parser.add_argument("--block-size", type=int, default=128, help="tokens per window")
    parser.add_argument(
        "--max-batches", type=int, help="batches per domain to count on (default: all)"
    )
    parser.add_argument("--report", help="also write the report JSON here")


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def add_prune_workflow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="pretrained ModuleFormer model directory or training out_dir")
    parser.add_argument("out", help="directory for the fine-tuned and pruned models")
    parser.add_argument(
        "--data", required=True, help="prepared data directory to fine-tune and count usage on"
    )
    parser.add_argument(
        "--workflow",
        required=True,
        choices=["finetune-then-prune", "prune-then-finetune"],
        help="finetune-then-prune: fine-tune once (with --load-concentration-weight), then "
        "prune at every threshold; prune-then-finetune: prune the pretrained model at each "
        "threshold, then fine-tune each pruned model",
    )
    parser.add_argument(
        "--thresholds",
        type=_float_list,
        required=True,
        help="comma-separated thresholds on the normalised activation frequency, e.g. 0.1,0.3",
    )
    parser.add_argument(
        "--domains",
        type=_name_list,
        help="comma-separated domains of --data to fine-tune and count usage on, e.g. python "
        "(default: the whole data)",
    )
    parser.add_argument(
        "--load-concentration-weight",
        type=float,
        help="weight of the load-concentration loss (eq. 8) while fine-tuning in "
        "finetune-then-prune (default: 0.001, the paper's; 0 fine-tunes without it); "
        "not used by prune-then-finetune",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="a `modformer train` setting of the fine-tuning, e.g. --set max_steps=200 "
        "(repeatable)",
    )
    parser.add_argument(
        "--norm",
        choices=list(NORMS),
        default="max",
        help="normalise each layer's frequencies by their max (default, as the paper) or sum",
    )
    parser.add_argument(
        "--split",
        default="val",
        choices=["train", "val"],
        help="split of --data to count usage on (default: val, as the paper)",
    )
    parser.add_argument(
        "--block-size", type=int, default=128, help="tokens per window when counting (128)"
    )
    parser.add_argument(
        "--max-batches", type=int, help="batches per domain to count usage on (default: all)"
    )


def add_extend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ModuleFormer model directory or training out_dir")
    parser.add_argument("out", help="directory for the extended model")
    parser.add_argument(
        "--new-experts", type=int, required=True, help="experts to insert in every layer"
    )
    parser.add_argument(
        "--only",
        choices=["attention", "ffn"],
        help="insert only attention or only FFN experts (default: both)",
    )
    parser.add_argument(
        "--train-embeddings",
        action="store_true",
        help="also train the token embedding (tied to the LM head); default: frozen",
    )
    parser.add_argument(
        "--routing-reg-weight",
        type=float,
        help="weight of the routing regulariser ||A'||^2 (eq. 10) in the following training "
        "(default: keep the model's)",
    )
    parser.add_argument(
        "--aux-loss-weight",
        type=float,
        default=0.0,
        help="weight of the load-balancing loss in the following training (default: 0, as "
        "the paper's partially trainable router; a negative value keeps the model's)",
    )
    parser.add_argument(
        "--router-init-std",
        type=float,
        help="std of the new router rows A' (default: the config's initializer_range)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the new weights (default 0)")


def add_forgetting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", required=True, help="where data, runs and results go")
    parser.add_argument(
        "--data",
        help="prepared data with the old and new domains (default: prepare the built-in "
        "corpus into OUT_DIR/data)",
    )
    parser.add_argument(
        "--pretrain-steps", type=int, default=300, help="pretraining steps (default: 300)"
    )
    parser.add_argument(
        "--steps", type=int, default=150, help="continual-training steps (default: 150)"
    )
    parser.add_argument(
        "--new-experts", type=int, default=2, help="experts inserted per layer (default: 2)"
    )
    parser.add_argument(
        "--reg-weights",
        type=_float_list,
        default=list(DEFAULT_REG_WEIGHTS),
        help="routing-regulariser weights of the insertion runs (default: 0,0.1,1)",
    )
    parser.add_argument(
        "--old-domains",
        default=",".join(DEFAULT_OLD_DOMAINS),
        help="comma-separated pretraining domains (default: prose,c)",
    )
    parser.add_argument(
        "--new-domain", default=DEFAULT_NEW_DOMAIN, help="continual domain (default: python)"
    )
    parser.add_argument("--preset", default="tiny", help="model size preset (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (16)")
    parser.add_argument("--block-size", type=int, default=64, help="tokens per sequence (64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (2e-3)")
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=4,
        help="val batches of 8 windows per domain (default: 4; 0: the whole validation split)",
    )
    parser.add_argument(
        "--trajectory-interval",
        type=int,
        default=15,
        help="evaluate full fine-tuning every N steps, to compare insertion with it at equal "
        "new-domain loss (default: 15; 0: only at the end)",
    )
    parser.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=1_000_000,
        help="text per built-in domain when preparing (default: 1 MB)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=1024, help="BPE vocabulary when preparing (1024)"
    )
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, the fastest for these tiny models on a "
        "shared machine; 0: torch's default)",
    )
    parser.add_argument("--progress", action="store_true", help="show training progress bars")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="export_kind", required=True, metavar="KIND")
    hf = sub.add_parser(
        "hf",
        help="write a native transformers directory (GPT -> GPT2LMHeadModel, "
        "JetMoE-style ModuleFormer -> JetMoeForCausalLM)",
        description="Write a saved model as a native transformers model directory "
        "(config.json + model.safetensors + tokenizer files) that plain transformers loads "
        "without modformer or trust_remote_code.",
    )
    hf.add_argument("model", help="saved model directory or training out_dir")
    hf.add_argument("dst", help="output directory")
    # `modformer export` runs modformer.convert.export.run_export (set by the CLI).


def add_reproduce_arguments(p: argparse.ArgumentParser) -> None:
    from modformer.experiments import EXPERIMENTS, SCALES

    p.add_argument(
        "name",
        choices=sorted(EXPERIMENTS),
        help="the experiment: "
        + "; ".join(f"{name}: {e.summary}" for name, e in sorted(EXPERIMENTS.items())),
    )
    p.add_argument(
        "--out-dir", help="where runs and results go (default: runs/reproduce/NAME); resumable"
    )
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated seeds, one run per arm each (default: 0,1,2)",
    )
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="full",
        help="full: the CPU-scale setting docs/results.md reports; long: 3x the training of "
        "full, headline arms only (the MoM experiments); quick: a few steps per arm, "
        "to check the plumbing (default: full)",
    )

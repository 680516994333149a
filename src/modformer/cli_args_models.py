"""Argument definitions of the commands that evaluate, sample from and convert saved
models: `eval`, `generate`, `convert` (one sub-parser per KIND) and `lm-eval`.

Torch-free like `modformer.cli_args`, so that building the parser stays quick.
"""

from __future__ import annotations

import argparse


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
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


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
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


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    conv = p.add_subparsers(dest="convert_kind", required=True, metavar="KIND")
    g = conv.add_parser(
        "gpt2",
        help="import a local Hugging Face GPT-2 directory",
        description="Import a local HF GPT-2 directory (config.json + model.safetensors) into a "
        "modformer GPT model directory; tokenizer files are copied along.",
    )
    g.add_argument("src", help="local Hugging Face GPT-2 directory")
    g.add_argument("dst", help="output model directory")
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

    for kind in conv.choices.values():  # no import replaces a model silently
        kind.add_argument("--overwrite", action="store_true", help="replace an existing DST model")


def add_lmeval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (with its tokenizer) or training out_dir")
    parser.add_argument(
        "--tasks", help="comma-separated lm-eval task names (e.g. modformer_python_completion)"
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of extra task YAMLs, e.g. docs/lm_eval_task (repeatable)",
    )
    parser.add_argument(
        "--no-default-tasks",
        action="store_true",
        help="index only the --include-path tasks (faster start-up)",
    )
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="requests per forward pass (default: 8)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", help="float32, bfloat16, float16 or auto (default: float32)"
    )
    parser.add_argument(
        "--limit", type=float, help="examples per task (a fraction if < 1; for quick checks)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of Python, NumPy, torch and few-shot sampling (default: 0)",
    )
    parser.add_argument("--output", help="write the results to this JSON file")
    parser.add_argument(
        "--write-remote-code",
        action="store_true",
        help="instead of evaluating: write the model code and auto_map into MODEL (saved "
        "models have them; this is for older directories) so that the plain "
        "`lm_eval --model hf --model_args pretrained=MODEL,trust_remote_code=True` works",
    )

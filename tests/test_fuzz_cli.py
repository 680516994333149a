"""Bad invocations of every command: each must fail with a non-zero status and one clear
message naming the problem, never a traceback, a silent success or a wrong result.

The commands run in-process through `modformer.cli.main(argv)` (argparse errors end in
SystemExit(2)); anything else that escapes is a traceback and fails the case. The small
models and data sets the cases point at are built once per session. A few good controls
check that the fixtures themselves are fine, so a bad case fails for its own reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modformer.cli import main
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.train.checkpoint import save_model_files

TINY_GPT = dict(vocab_size=257, n_positions=128, n_embd=16, n_head=2, n_layer=1)
TINY_OVERRIDES = "{n_layer: 1, n_embd: 16, n_head: 2, n_positions: 128}"


class Exploit:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def write_exploit(path: Path, marker: Path) -> None:
    torch.save({"state": Exploit(marker), "w": torch.zeros(2)}, path)


@pytest.fixture(scope="session")
def env(tiny_data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    tok = tiny_data_dir / "tokenizer"
    torch.manual_seed(0)
    paths: dict[str, Path] = {"data": tiny_data_dir, "root": root}

    gpt = GPTForCausalLM(GPTConfig(**TINY_GPT))
    save_model_files(gpt, root / "gpt", tok)
    paths["gpt"] = root / "gpt"

    mf = ModuleFormerForCausalLM(
        ModuleFormerConfig.from_preset(
            "tiny", vocab_size=257, n_layer=1, n_embd=16, att_hidden=8, ffd_hidden=16
        )
    )
    save_model_files(mf, root / "mf", tok)
    paths["mf"] = root / "mf"

    # A GPT whose vocabulary is smaller than the data's / the tokenizer's.
    small = GPTForCausalLM(GPTConfig(**{**TINY_GPT, "vocab_size": 100}))
    save_model_files(small, root / "small_vocab", tok)
    paths["small_vocab"] = root / "small_vocab"

    # Foreign and broken model directories.
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(tok / "tokenizer.json", root / "bert" / "tokenizer.json")
    paths["bert"] = root / "bert"
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text("{not json")
    paths["badjson"] = root / "badjson"
    (root / "listjson").mkdir()
    (root / "listjson" / "config.json").write_text("[1, 2]")
    paths["listjson"] = root / "listjson"
    # Weights that do not match config.json (no manifest, so from_pretrained would fill
    # the missing layer with a random init).
    shutil.copytree(root / "gpt", root / "mismatch")
    (root / "mismatch" / "manifest.json").unlink()
    config = json.loads((root / "mismatch" / "config.json").read_text())
    (root / "mismatch" / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    paths["mismatch"] = root / "mismatch"
    shutil.copytree(root / "mismatch", root / "wrongshape")
    (root / "wrongshape" / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    paths["wrongshape"] = root / "wrongshape"
    # The same edit with the manifest in place: caught as a corrupt file.
    shutil.copytree(root / "gpt", root / "tampered")
    (root / "tampered" / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    paths["tampered"] = root / "tampered"
    # Flipped bytes in the weights.
    shutil.copytree(root / "gpt", root / "flipped")
    weights = root / "flipped" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    paths["flipped"] = root / "flipped"
    shutil.copytree(root / "gpt", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    (root / "truncated" / "manifest.json").unlink()
    paths["truncated"] = root / "truncated"
    shutil.copytree(root / "gpt", root / "empty_weights")
    (root / "empty_weights" / "model.safetensors").write_bytes(b"")
    (root / "empty_weights" / "manifest.json").unlink()
    paths["empty_weights"] = root / "empty_weights"
    # A model holding a NaN.
    nan = GPTForCausalLM(GPTConfig(**TINY_GPT))
    with torch.no_grad():
        nan.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_model_files(nan, root / "nan", tok)
    paths["nan"] = root / "nan"
    # Pickled weights that would run code: a modformer config and an HF GPT-2 config.
    paths["marker"] = root / "PWNED"
    for name, model_type in (("evil_bin", "modformer_gpt"), ("evil_gpt2", "gpt2")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        write_exploit(root / name / "pytorch_model.bin", paths["marker"])
        paths[name] = root / name
    (root / "gpt2_empty").mkdir()
    (root / "gpt2_empty" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    paths["gpt2_empty"] = root / "gpt2_empty"
    # A model without tokenizer.
    save_model_files(gpt, root / "no_tok")
    paths["no_tok"] = root / "no_tok"

    # Data whose token ids exceed the model's vocabulary: meta.json of an older prepare
    # (no max_token_id), so the reader must scan.
    shutil.copytree(tiny_data_dir, root / "bad_ids")
    meta = json.loads((root / "bad_ids" / "meta.json").read_text())
    for split in meta["splits"].values():
        split.pop("max_token_id", None)
    (root / "bad_ids" / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        tokens = np.memmap(root / "bad_ids" / f"{split}.bin", dtype=meta["dtype"], mode="r+")
        tokens[len(tokens) // 2] = 300
        tokens.flush()
        del tokens
    paths["bad_ids"] = root / "bad_ids"
    shutil.copytree(tiny_data_dir, root / "bad_meta")
    (root / "bad_meta" / "meta.json").write_text("{")
    paths["bad_meta"] = root / "bad_meta"

    # A regular file that output paths are put under; a finished training run.
    (root / "blocker").write_text("a file, not a directory\n")
    paths["blocker"] = root / "blocker"
    finished = root / "finished"
    save_model_files(gpt, finished / "model", tok)
    (finished / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (finished / "final.json").write_text('{"step": 1}\n')
    paths["finished"] = finished
    (root / "eval.json").write_text("{}")
    (root / "curves.png").write_bytes(b"an earlier figure")
    paths["existing_png"] = root / "curves.png"
    paths["existing_json"] = root / "eval.json"
    (root / "text.txt").write_text("def alpha_beta(x): return x + gamma\n" * 20)
    paths["text"] = root / "text.txt"
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    paths["binary"] = root / "binary.txt"
    (root / "bad.yaml").write_text("optim: [unclosed\n")
    paths["bad_yaml"] = root / "bad.yaml"
    (root / "bad.json").write_text('{"optim": }')
    paths["bad_json_cfg"] = root / "bad.json"
    (root / "list.yaml").write_text("- 1\n- 2\n")
    paths["list_yaml"] = root / "list.yaml"
    (root / "metrics_dir").mkdir()
    (root / "metrics_dir" / "metrics.jsonl").write_text("not json\n")
    paths["bad_metrics"] = root / "metrics_dir"
    (root / "empty_dir").mkdir()
    paths["empty_dir"] = root / "empty_dir"
    (root / "cls.csv").write_text("sentence,label\nalpha beta,0\ngamma delta,1\n")
    paths["csv"] = root / "cls.csv"
    return paths


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `modformer argv`; any exception but SystemExit
    propagates and fails the test (it would be a traceback for the user)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_argv(data: str, out: str, *extra: str) -> list[str]:
    return [
        "train",
        "--data.dir",
        data,
        "--out_dir",
        out,
        "--data.block_size",
        "16",
        "--batch_size",
        "2",
        "--max_steps",
        "2",
        "--eval_batches",
        "1",
        "--progress",
        "false",
        "--model.overrides",
        TINY_OVERRIDES,
        *extra,
    ]


# (case id, argv with {placeholders} for fixture paths, expected text in stderr).
# {out} is a fresh path under the test's tmp_path; {blocked} is a path under a regular file.
BAD: list[tuple[str, list[str], str]] = [
    # ---- top level and argparse
    ("no-command", [], "required: COMMAND"),
    ("unknown-command", ["frobnicate"], "invalid choice"),
    ("unknown-option", ["eval", "{gpt}", "--data", "{data}", "--bogus"], "unrecognized arguments"),
    # ---- prepare
    ("prepare-missing-out", ["prepare"], "output_dir"),
    (
        "prepare-missing-input",
        ["prepare", "{out}", "--inputs", "{root}/nothing_here.txt"],
        "nothing_here",
    ),
    (
        "prepare-val-fraction-0",
        ["prepare", "{out}", "--inputs", "{text}", "--tokenizer", "byte", "--val-fraction", "0"],
        "val_fraction",
    ),
    (
        "prepare-val-fraction-big",
        ["prepare", "{out}", "--inputs", "{text}", "--tokenizer", "byte", "--val-fraction", "0.9"],
        "val_fraction",
    ),
    ("prepare-val-fraction-text", ["prepare", "{out}", "--val-fraction", "abc"], "invalid float"),
    (
        "prepare-vocab-tiny",
        ["prepare", "{out}", "--inputs", "{text}", "--vocab-size", "10"],
        "vocab",
    ),
    ("prepare-bad-domain", ["prepare", "{out}", "--domains", "klingon"], "klingon"),
    (
        "prepare-existing",
        ["prepare", "{data}", "--inputs", "{text}", "--tokenizer", "byte"],
        "--overwrite",
    ),
    (
        "prepare-out-is-file",
        ["prepare", "{blocker}", "--inputs", "{text}", "--tokenizer", "byte"],
        "not a directory",
    ),
    (
        "prepare-out-under-file",
        ["prepare", "{blocked}", "--inputs", "{text}", "--tokenizer", "byte"],
        "is a file",
    ),
    (
        "prepare-bad-tokenizer-path",
        ["prepare", "{out}", "--inputs", "{text}", "--tokenizer", "{root}/no_tokenizer"],
        "no_tokenizer",
    ),
    ("prepare-seed-text", ["prepare", "{out}", "--seed", "x"], "invalid int"),
    ("prepare-empty-domains", ["prepare", "{out}", "--domains", ","], "domain"),
    # ---- train: configuration
    (
        "train-lr-negative",
        train_argv("{data}", "{out}", "--optim.lr", "-1"),
        "optim.lr must be > 0",
    ),
    (
        "train-lr-inf",
        train_argv("{data}", "{out}", "--optim.lr", "inf"),
        "optim.lr must be a finite number",
    ),
    (
        "train-lr-nan",
        train_argv("{data}", "{out}", "--optim.lr", "nan"),
        "optim.lr must be a finite number",
    ),
    (
        "train-lr-text",
        train_argv("{data}", "{out}", "--optim.lr", "fast"),
        "optim.lr: expected a number",
    ),
    ("train-eps-zero", train_argv("{data}", "{out}", "--optim.eps", "0"), "optim.eps must be > 0"),
    (
        "train-steps-zero",
        train_argv("{data}", "{out}", "--max_steps", "0"),
        "max_steps must be >= 1",
    ),
    (
        "train-batch-zero",
        train_argv("{data}", "{out}", "--batch_size", "0"),
        "batch_size must be >= 1",
    ),
    (
        "train-block-one",
        train_argv("{data}", "{out}", "--data.block_size", "1"),
        "data.block_size must be >= 2",
    ),
    (
        "train-block-too-long",
        train_argv("{data}", "{out}", "--data.block_size", "1000"),
        "n_positions",
    ),
    ("train-precision", train_argv("{data}", "{out}", "--precision", "fp8"), "precision must be"),
    (
        "train-nonfinite-option",
        train_argv("{data}", "{out}", "--nonfinite", "ignore"),
        "nonfinite must be stop or skip",
    ),
    ("train-arch", train_argv("{data}", "{out}", "--model.arch", "lstm"), "unknown architecture"),
    ("train-preset", train_argv("{data}", "{out}", "--model.preset", "huge"), "preset"),
    (
        "train-override-typo",
        train_argv("{data}", "{out}", "--set", "model.overrides={n_embdd: 8}"),
        "n_embdd",
    ),
    (
        "train-unknown-setting",
        train_argv("{data}", "{out}", "--set", "optim.lrate=1"),
        "did you mean optim.lr",
    ),
    (
        "train-set-no-equals",
        train_argv("{data}", "{out}", "--set", "optim.lr"),
        "must look like section.field=value",
    ),
    ("train-set-not-section", train_argv("{data}", "{out}", "--set", "seed.x=1"), "seed"),
    (
        "train-device-cuda",
        train_argv("{data}", "{out}", "--device", "cuda"),
        "CUDA is not available",
    ),
    ("train-device-bogus", train_argv("{data}", "{out}", "--device", "tpu"), "is not a device"),
    ("train-config-missing", ["train", "--config", "{root}/none.yaml"], "does not exist"),
    ("train-config-bad-yaml", ["train", "--config", "{bad_yaml}"], "not valid"),
    ("train-config-bad-json", ["train", "--config", "{bad_json_cfg}"], "not valid json"),
    ("train-config-list", ["train", "--config", "{list_yaml}"], "must hold a mapping"),
    (
        "train-bool-text",
        train_argv("{data}", "{out}", "--progress", "maybe"),
        "expected true/false",
    ),
    # 2**57 rows: the batch needs 2**60 bytes, beyond any address space, so the allocation
    # fails at once on every machine (no memory is touched).
    (
        "train-batch-too-large",
        train_argv("{data}", "{out}", "--batch_size", str(2**57)),
        "out of memory; lower the batch size",
    ),
    (
        "train-keep-last-zero",
        train_argv("{data}", "{out}", "--keep_last", "0"),
        "keep_last must be >= 1",
    ),
    (
        "train-grad-clip-neg",
        train_argv("{data}", "{out}", "--optim.grad_clip", "-1"),
        "optim.grad_clip must be >= 0",
    ),
    (
        "train-beta-one",
        train_argv("{data}", "{out}", "--optim.beta1", "1"),
        "optim.beta1 must be in",
    ),
    (
        "train-min-lr",
        train_argv("{data}", "{out}", "--optim.min_lr", "1"),
        "optim.min_lr must be in",
    ),
    # ---- train: data and models at the door
    ("train-data-missing", train_argv("{root}/no_data", "{out}"), "does not exist"),
    ("train-data-bad-meta", train_argv("{bad_meta}", "{out}"), "meta.json"),
    ("train-data-ids-over-vocab", train_argv("{bad_ids}", "{out}"), "token id 300"),
    (
        "train-data-bad-domain",
        train_argv("{data}", "{out}", "--data.domains", "nope"),
        "unknown domain",
    ),
    (
        "train-vocab-override-small",
        train_argv("{data}", "{out}", "--set", "model.overrides={vocab_size: 100}"),
        "does not fit the model's vocab_size",
    ),
    (
        "train-init-from-missing",
        train_argv("{data}", "{out}", "--model.init_from", "{root}/none"),
        "not a saved model directory",
    ),
    (
        "train-init-from-bert",
        train_argv("{data}", "{out}", "--model.init_from", "{bert}"),
        "'bert' model",
    ),
    (
        "train-init-from-badjson",
        train_argv("{data}", "{out}", "--model.init_from", "{badjson}"),
        "not valid JSON",
    ),
    (
        "train-init-from-mismatch",
        train_argv("{data}", "{out}", "--model.init_from", "{mismatch}"),
        "do not match its config.json",
    ),
    (
        "train-init-from-nan",
        train_argv("{data}", "{out}", "--model.init_from", "{nan}"),
        "NaN or inf",
    ),
    (
        "train-init-from-flipped",
        train_argv("{data}", "{out}", "--model.init_from", "{flipped}"),
        "does not match its sha256",
    ),
    (
        "train-init-from-pickle",
        train_argv("{data}", "{out}", "--model.init_from", "{evil_bin}"),
        "never unpickled",
    ),
    (
        "train-init-from-small-vocab",
        train_argv("{data}", "{out}", "--model.init_from", "{small_vocab}"),
        "does not fit the model's vocab_size",
    ),
    (
        "train-history-not-sequential",
        train_argv(
            "{data}",
            "{out}",
            "--model.arch",
            "moduleformer",
            "--set",
            "model.overrides={n_layer: 1, n_embd: 16, att_hidden: 8, ffd_hidden: 16, use_history: true}",
        ),
        "data.sequential=true",
    ),
    # ---- train: output directory
    ("train-out-under-file", train_argv("{data}", "{blocked}"), "is a file"),
    ("train-out-is-file", train_argv("{data}", "{blocker}"), "not a directory"),
    ("train-finished-run", train_argv("{data}", "{finished}"), "pass --overwrite"),
    (
        "train-finished-run-resume",
        train_argv("{data}", "{finished}", "--resume"),
        "no checkpoint to resume from",
    ),
    # ---- eval
    ("eval-missing-model", ["eval", "{root}/none", "--data", "{data}"], "does not exist"),
    ("eval-no-model", ["eval", "{empty_dir}", "--data", "{data}"], "holds no saved model"),
    ("eval-needs-source", ["eval", "{gpt}"], "one of the arguments --data --text is required"),
    (
        "eval-both-sources",
        ["eval", "{gpt}", "--data", "{data}", "--text", "{text}"],
        "not allowed with",
    ),
    ("eval-bert", ["eval", "{bert}", "--data", "{data}"], "'bert' model, not a modformer model"),
    ("eval-badjson", ["eval", "{badjson}", "--data", "{data}"], "not valid JSON"),
    ("eval-listjson", ["eval", "{listjson}", "--data", "{data}"], "must hold a JSON object"),
    ("eval-mismatch", ["eval", "{mismatch}", "--data", "{data}"], "missing keys"),
    ("eval-wrongshape", ["eval", "{wrongshape}", "--data", "{data}"], "do not match config.json"),
    ("eval-tampered", ["eval", "{tampered}", "--data", "{data}"], "tampered: config.json has"),
    ("eval-flipped", ["eval", "{flipped}", "--data", "{data}"], "model.safetensors does not match"),
    ("eval-truncated", ["eval", "{truncated}", "--data", "{data}"], "cannot load the model"),
    (
        "eval-empty-weights",
        ["eval", "{empty_weights}", "--data", "{data}"],
        "cannot load the model",
    ),
    ("eval-nan", ["eval", "{nan}", "--data", "{data}"], "NaN or inf"),
    ("eval-pickle", ["eval", "{evil_bin}", "--data", "{data}"], "never unpickled"),
    ("eval-gpt2-dir", ["eval", "{evil_gpt2}", "--data", "{data}"], "modformer convert gpt2"),
    ("eval-data-missing", ["eval", "{gpt}", "--data", "{root}/no_data"], "does not exist"),
    ("eval-data-bad-ids", ["eval", "{gpt}", "--data", "{bad_ids}"], "token id 300"),
    ("eval-data-vocab", ["eval", "{small_vocab}", "--data", "{data}"], "vocab_size 257"),
    (
        "eval-bad-domain",
        ["eval", "{gpt}", "--data", "{data}", "--domains", "nope"],
        "unknown domain",
    ),
    (
        "eval-block-one",
        ["eval", "{gpt}", "--data", "{data}", "--block-size", "1"],
        "--block-size must be >= 2",
    ),
    (
        "eval-block-long",
        ["eval", "{gpt}", "--data", "{data}", "--block-size", "1000"],
        "exceeds the model's context",
    ),
    (
        "eval-batch-zero",
        ["eval", "{gpt}", "--data", "{data}", "--batch-size", "0"],
        "--batch-size must be >= 1",
    ),
    (
        "eval-max-batches-zero",
        ["eval", "{gpt}", "--data", "{data}", "--max-batches", "0"],
        "--max-batches must be >= 1",
    ),
    ("eval-split", ["eval", "{gpt}", "--data", "{data}", "--split", "test"], "invalid choice"),
    (
        "eval-device-cuda",
        ["eval", "{gpt}", "--data", "{data}", "--device", "cuda"],
        "CUDA is not available",
    ),
    (
        "eval-device-bogus",
        ["eval", "{gpt}", "--data", "{data}", "--device", "gpu0"],
        "is not a device",
    ),
    (
        "eval-json-under-file",
        ["eval", "{gpt}", "--data", "{data}", "--json", "{blocked}/r.json"],
        "is a file",
    ),
    (
        "eval-json-is-dir",
        ["eval", "{gpt}", "--data", "{data}", "--json", "{empty_dir}"],
        "is a directory",
    ),
    (
        "eval-json-exists",
        ["eval", "{gpt}", "--data", "{data}", "--json", "{existing_json}"],
        "pass --overwrite",
    ),
    ("eval-text-missing", ["eval", "{gpt}", "--text", "{root}/none.txt"], "does not exist"),
    ("eval-text-binary", ["eval", "{gpt}", "--text", "{binary}"], "not UTF-8"),
    ("eval-text-no-tokenizer", ["eval", "{no_tok}", "--text", "{text}"], "no tokenizer.json"),
    (
        "eval-text-big-tokenizer",
        ["eval", "{small_vocab}", "--text", "{text}"],
        "257 tokens but the model only 100",
    ),
    # ---- generate
    ("generate-missing", ["generate", "{root}/none"], "does not exist"),
    ("generate-bert", ["generate", "{bert}"], "'bert' model"),
    ("generate-no-tokenizer", ["generate", "{no_tok}"], "no tokenizer.json"),
    (
        "generate-big-tokenizer",
        ["generate", "{small_vocab}", "--prompt", "def"],
        "257 tokens but the model only 100",
    ),
    ("generate-top-k-zero", ["generate", "{gpt}", "--top-k", "0"], "top_k must be >= 1"),
    ("generate-top-k-negative", ["generate", "{gpt}", "--top-k", "-3"], "top_k must be >= 1"),
    (
        "generate-temperature-zero",
        ["generate", "{gpt}", "--temperature", "0"],
        "temperature must be",
    ),
    (
        "generate-temperature-nan",
        ["generate", "{gpt}", "--temperature", "nan"],
        "temperature must be",
    ),
    (
        "generate-max-new-zero",
        ["generate", "{gpt}", "--max-new-tokens", "0"],
        "--max-new-tokens must be >= 1",
    ),
    ("generate-device-cuda", ["generate", "{gpt}", "--device", "cuda"], "CUDA is not available"),
    ("generate-nan", ["generate", "{nan}"], "NaN or inf"),
    ("generate-pickle", ["generate", "{evil_bin}"], "never unpickled"),
    ("generate-seed-text", ["generate", "{gpt}", "--seed", "one"], "invalid int"),
    # ---- convert
    ("convert-no-kind", ["convert"], "KIND"),
    ("convert-gpt2-missing", ["convert", "gpt2", "{root}/none", "{out}"], "not a directory"),
    ("convert-gpt2-bert", ["convert", "gpt2", "{bert}", "{out}"], "'bert' model, not gpt2"),
    ("convert-gpt2-badjson", ["convert", "gpt2", "{badjson}", "{out}"], "not valid JSON"),
    ("convert-gpt2-pickle", ["convert", "gpt2", "{evil_gpt2}", "{out}"], "refusing to run it"),
    (
        "convert-gpt2-no-weights",
        ["convert", "gpt2", "{gpt2_empty}", "{out}"],
        "has no model.safetensors",
    ),
    ("convert-gpt2-dst-under-file", ["convert", "gpt2", "{evil_gpt2}", "{blocked}"], "is a file"),
    ("convert-gpt2-dst-exists", ["convert", "gpt2", "{evil_gpt2}", "{gpt}"], "pass --overwrite"),
    (
        "convert-gpt2-dst-not-model",
        ["convert", "gpt2", "{evil_gpt2}", "{bad_metrics}"],
        "holds no model",
    ),
    (
        "convert-mom-bert",
        ["convert", "mom", "--from", "{bert}", "--config", "K2H2S", "{out}"],
        "'bert' model",
    ),
    (
        "convert-mom-mismatch",
        ["convert", "mom", "--from", "{mismatch}", "--config", "K2H2S", "{out}"],
        "missing keys",
    ),
    (
        "convert-mom-badjson",
        ["convert", "mom", "--from", "{badjson}", "--config", "K2H2S", "{out}"],
        "not a JSON object",
    ),
    (
        "convert-mom-from-mf",
        ["convert", "mom", "--from", "{mf}", "--config", "K2H2S", "{out}"],
        "vanilla model",
    ),
    (
        "convert-mom-bad-name",
        ["convert", "mom", "--from", "{gpt}", "--config", "Q9", "--chunks", "[1]", "{out}"],
        "Q9",
    ),
    (
        "convert-mom-bad-chunks",
        ["convert", "mom", "--from", "{gpt}", "--config", "K2H2S", "--chunks", "[1-9]", "{out}"],
        "chunk",
    ),
    (
        "convert-mom-bad-policy",
        [
            "convert",
            "mom",
            "--from",
            "{gpt}",
            "--config",
            "K2H2S",
            "--policy",
            "random",
            "--chunks",
            "[1]",
            "{out}",
        ],
        "random",
    ),
    (
        "convert-mom-dst-under-file",
        ["convert", "mom", "--from", "{gpt}", "--config", "K2H2S", "{blocked}"],
        "is a file",
    ),
    (
        "convert-mom-pickle",
        ["convert", "mom", "--from", "{evil_gpt2}", "--config", "K2H2S", "{out}"],
        "refusing to run it",
    ),
    ("convert-official-bert", ["convert", "mom-official", "{bert}", "{out}"], "bert"),
    ("convert-official-pickle", ["convert", "mom-official", "{evil_gpt2}", "{out}"], "gpt2"),
    (
        "convert-official-dst-exists",
        ["convert", "mom-official", "{bert}", "{gpt}"],
        "pass --overwrite",
    ),
    (
        "convert-official-dst-under-file",
        ["convert", "mom-official", "{bert}", "{blocked}"],
        "is a file",
    ),
    ("convert-moduleformer-bert", ["convert", "moduleformer", "{bert}", "{out}"], "bert"),
    (
        "convert-moduleformer-dst-exists",
        ["convert", "moduleformer", "{bert}", "{gpt}"],
        "pass --overwrite",
    ),
    ("convert-jetmoe-bert", ["convert", "jetmoe", "{bert}", "{out}"], "bert"),
    ("convert-jetmoe-dst-under-file", ["convert", "jetmoe", "{bert}", "{blocked}"], "is a file"),
    # ---- export
    ("export-no-kind", ["export"], "KIND"),
    ("export-bert", ["export", "hf", "{bert}", "{out}"], "'bert' model"),
    ("export-missing", ["export", "hf", "{root}/none", "{out}"], "does not exist"),
    ("export-nan", ["export", "hf", "{nan}", "{out}"], "NaN or inf"),
    ("export-dst-exists", ["export", "hf", "{gpt}", "{mf}"], "pass --overwrite"),
    ("export-dst-under-file", ["export", "hf", "{gpt}", "{blocked}"], "is a file"),
    # ---- finetune
    (
        "finetune-missing-task",
        ["finetune", "{gpt}", "--train", "{csv}", "--out", "{out}"],
        "--task",
    ),
    (
        "finetune-bad-task",
        ["finetune", "{gpt}", "--task", "translate", "--train", "{csv}", "--out", "{out}"],
        "invalid choice",
    ),
    (
        "finetune-train-missing",
        ["finetune", "{gpt}", "--task", "classify", "--train", "{root}/none.csv", "--out", "{out}"],
        "none.csv",
    ),
    (
        "finetune-bert",
        ["finetune", "{bert}", "--task", "classify", "--train", "{csv}", "--out", "{out}"],
        "'bert' model",
    ),
    (
        "finetune-out-under-file",
        ["finetune", "{gpt}", "--task", "classify", "--train", "{csv}", "--out", "{blocked}"],
        "is a file",
    ),
    (
        "finetune-lr-text",
        [
            "finetune",
            "{gpt}",
            "--task",
            "classify",
            "--train",
            "{csv}",
            "--out",
            "{out}",
            "--lr",
            "x",
        ],
        "invalid float",
    ),
    (
        "finetune-out-exists",
        ["finetune", "{gpt}", "--task", "classify", "--train", "{csv}", "--out", "{bad_metrics}"],
        "pass --overwrite",
    ),
    # ---- lm-eval
    ("lmeval-missing-model", ["lm-eval", "{root}/none", "--tasks", "x"], "does not exist"),
    ("lmeval-bert", ["lm-eval", "{bert}", "--write-remote-code"], "bert"),
    ("lmeval-output-under-file", ["lm-eval", "{gpt}", "--output", "{blocked}/r.json"], "is a file"),
    ("lmeval-limit-text", ["lm-eval", "{gpt}", "--limit", "many"], "invalid"),
    # ---- reproduce
    ("reproduce-bad-seeds", ["reproduce", "mom-vs-vanilla", "--seeds", "0,x"], "--seeds '0,x'"),
    ("reproduce-no-seeds", ["reproduce", "mom-vs-vanilla", "--seeds", ","], "seeds must be"),
    # ---- plot-curves
    ("plot-no-runs", ["plot-curves", "--out", "{out}.png"], "RUN"),
    ("plot-missing-run", ["plot-curves", "{root}/none", "--out", "{out}.png"], "none"),
    ("plot-bad-metrics", ["plot-curves", "{bad_metrics}", "--out", "{out}.png"], "metrics.jsonl"),
    ("plot-out-under-file", ["plot-curves", "{finished}", "--out", "{blocked}/c.png"], "is a file"),
    (
        "plot-out-exists",
        ["plot-curves", "{finished}", "--out", "{existing_png}"],
        "pass --overwrite",
    ),
    (
        "plot-smooth-text",
        ["plot-curves", "{finished}", "--out", "{out}.png", "--smooth", "x"],
        "invalid",
    ),
    # ---- cost
    ("cost-bert", ["cost", "{bert}"], "'bert' model"),
    ("cost-missing", ["cost", "{root}/none"], "does not exist"),
    ("cost-bad-config", ["cost", "--config", "nonsense"], "nonsense"),
    ("cost-json-under-file", ["cost", "{gpt}", "--json", "{blocked}/c.json"], "is a file"),
    ("cost-seq-len-text", ["cost", "{gpt}", "--seq-len", "long"], "invalid int"),
    ("cost-device-cuda", ["cost", "{gpt}", "--device", "cuda"], "CUDA"),
    ("cost-json-exists", ["cost", "{gpt}", "--json", "{existing_json}"], "pass --overwrite"),
    # ---- usage
    ("usage-gpt", ["usage", "{gpt}", "{data}"], "ModuleFormer or MoM"),
    ("usage-missing-data", ["usage", "{mf}", "{root}/no_data"], "does not exist"),
    ("usage-bad-ids", ["usage", "{mf}", "{bad_ids}"], "token id 300"),
    ("usage-out-under-file", ["usage", "{mf}", "{data}", "--out", "{blocked}/u.json"], "is a file"),
    ("usage-norm", ["usage", "{mf}", "{data}", "--norm", "l2"], "invalid choice"),
    ("usage-bert", ["usage", "{bert}", "{data}"], "'bert' model"),
    (
        "usage-out-exists",
        ["usage", "{mf}", "{data}", "--out", "{existing_json}"],
        "pass --overwrite",
    ),
    # ---- routing-report
    ("routing-missing-out", ["routing-report", "{mf}", "{data}"], "--out-dir"),
    (
        "forgetting-out-dir-exists",
        ["forgetting", "--out-dir", "{finished}"],
        "pass --overwrite",
    ),
    (
        "routing-out-dir-exists",
        ["routing-report", "{mf}", "{data}", "--out-dir", "{finished}"],
        "pass --overwrite",
    ),
    (
        "routing-out-under-file",
        ["routing-report", "{mf}", "{data}", "--out-dir", "{blocked}"],
        "is a file",
    ),
    (
        "routing-out-is-file",
        ["routing-report", "{mf}", "{data}", "--out-dir", "{blocker}"],
        "not a directory",
    ),
    (
        "routing-gpt",
        ["routing-report", "{gpt}", "{data}", "--out-dir", "{out}"],
        "ModuleFormer or MoM",
    ),
    ("routing-nan", ["routing-report", "{nan}", "{data}", "--out-dir", "{out}"], "NaN or inf"),
    # ---- sweep
    ("sweep-no-grid", ["sweep", "--out-dir", "{out}"], "--grid"),
    ("sweep-bad-grid", ["sweep", "--grid", "optim.lr", "--out-dir", "{out}"], "optim.lr"),
    (
        "sweep-out-under-file",
        ["sweep", "--grid", "optim.lr=1e-3,2e-3", "--out-dir", "{blocked}"],
        "is a file",
    ),
    (
        "sweep-unknown-setting",
        ["sweep", "--grid", "optim.lrate=1,2", "--out-dir", "{out}"],
        "lrate",
    ),
    # ---- prune
    (
        "prune-gpt",
        ["prune", "{gpt}", "{out}", "--data", "{data}", "--threshold", "0.1"],
        "ModuleFormer or MoM",
    ),
    ("prune-no-threshold", ["prune", "{mf}", "{out}", "--data", "{data}"], "--threshold"),
    (
        "prune-out-under-file",
        ["prune", "{mf}", "{blocked}", "--data", "{data}", "--threshold", "0.1"],
        "cannot create OUT",
    ),
    (
        "prune-bad-threshold",
        ["prune", "{mf}", "{out}", "--data", "{data}", "--threshold", "-1"],
        "threshold",
    ),
    (
        "prune-usage-missing",
        ["prune", "{mf}", "{out}", "--usage", "{root}/none.json", "--threshold", "0.1"],
        "none.json",
    ),
    (
        "prune-out-exists",
        ["prune", "{mf}", "{gpt}", "--data", "{data}", "--threshold", "0.1"],
        "already holds earlier results",
    ),
    (
        "prune-report-exists",
        [
            "prune",
            "{mf}",
            "{out}",
            "--data",
            "{data}",
            "--threshold",
            "0.1",
            "--report",
            "{existing_json}",
        ],
        "--report",
    ),
    # ---- prune-workflow
    (
        "prune-workflow-no-workflow",
        ["prune-workflow", "{mf}", "{out}", "--data", "{data}", "--thresholds", "0.1"],
        "--workflow",
    ),
    (
        "prune-workflow-gpt",
        [
            "prune-workflow",
            "{gpt}",
            "{out}",
            "--data",
            "{data}",
            "--workflow",
            "finetune-then-prune",
            "--thresholds",
            "0.1",
        ],
        "ModuleFormer",
    ),
    (
        "prune-workflow-bad-threshold",
        [
            "prune-workflow",
            "{mf}",
            "{out}",
            "--data",
            "{data}",
            "--workflow",
            "finetune-then-prune",
            "--thresholds",
            "2",
        ],
        "threshold",
    ),
    (
        "prune-workflow-thresholds-text",
        [
            "prune-workflow",
            "{mf}",
            "{out}",
            "--data",
            "{data}",
            "--workflow",
            "prune-then-finetune",
            "--thresholds",
            "a,b",
        ],
        "comma-separated numbers",
    ),
    (
        "prune-workflow-unknown-domain",
        [
            "prune-workflow",
            "{mf}",
            "{out}",
            "--data",
            "{data}",
            "--workflow",
            "finetune-then-prune",
            "--thresholds",
            "0.1",
            "--domains",
            "rust",
        ],
        "unknown domain",
    ),
    (
        "prune-workflow-empty-domains",
        [
            "prune-workflow",
            "{mf}",
            "{out}",
            "--data",
            "{data}",
            "--workflow",
            "finetune-then-prune",
            "--thresholds",
            "0.1",
            "--domains",
            ",",
        ],
        "comma-separated names",
    ),
    (
        "prune-workflow-lc-with-pf",
        [
            "prune-workflow",
            "{mf}",
            "{out}",
            "--data",
            "{data}",
            "--workflow",
            "prune-then-finetune",
            "--thresholds",
            "0.1",
            "--load-concentration-weight",
            "0.1",
        ],
        "applies to finetune-then-prune",
    ),
    (
        "prune-workflow-out-exists",
        [
            "prune-workflow",
            "{mf}",
            "{gpt}",
            "--data",
            "{data}",
            "--workflow",
            "finetune-then-prune",
            "--thresholds",
            "0.1",
        ],
        "already holds earlier results",
    ),
    # ---- extend
    ("extend-gpt", ["extend", "{gpt}", "{out}", "--new-experts", "2"], "ModuleFormer"),
    ("extend-zero", ["extend", "{mf}", "{out}", "--new-experts", "0"], "new"),
    ("extend-out-under-file", ["extend", "{mf}", "{blocked}", "--new-experts", "2"], "is a file"),
    ("extend-text", ["extend", "{mf}", "{out}", "--new-experts", "two"], "invalid int"),
    ("extend-out-exists", ["extend", "{mf}", "{gpt}", "--new-experts", "2"], "pass --overwrite"),
    # ---- reproduce
    ("reproduce-no-name", ["reproduce"], "required"),
    ("reproduce-unknown", ["reproduce", "nonexistent-experiment"], "invalid choice"),
    ("reproduce-scale", ["reproduce", "x", "--scale", "huge"], "invalid choice"),
    # ---- forgetting and demo
    ("forgetting-out-under-file", ["forgetting", "--out-dir", "{blocked}"], "is a file"),
    (
        "forgetting-bad-domain",
        ["forgetting", "--out-dir", "{out}", "--data", "{data}", "--new-domain", "nope"],
        "nope",
    ),
    ("forgetting-steps-text", ["forgetting", "--out-dir", "{out}", "--steps", "x"], "invalid int"),
    ("demo-bad-stage", ["demo", "--work-dir", "{out}", "--stages", "dance"], "dance"),
    ("demo-work-under-file", ["demo", "--work-dir", "{blocked}"], "is a file"),
    ("demo-steps-text", ["demo", "--steps", "x"], "invalid int"),
]


def fill(argv: list[str], env: dict[str, Path], out: Path) -> list[str]:
    """Replace {name} by the fixture path `name` ({out}: a fresh path; {blocked}: a path
    under a regular file); other braces (YAML) stay."""
    names = {name: str(path) for name, path in env.items()}
    names.update(out=str(out), blocked=str(env["blocker"] / "sub"))
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, names)) + r")\}")
    return [pattern.sub(lambda m: names[m.group(1)], arg) for arg in argv]


def test_at_least_100_bad_invocations_over_every_command():
    from modformer.cli import build_parser

    assert len(BAD) >= 100
    assert len({case[0] for case in BAD}) == len(BAD)
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    covered = {argv[0] for _, argv, _ in BAD if argv}
    assert set(sub.choices) <= covered, set(sub.choices) - covered


@pytest.mark.parametrize("argv,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_invocation_fails_clearly(argv, expected, env, tmp_path, capsys):
    code, out, err = run_cli(fill(argv, env, tmp_path / "out"), capsys)
    assert code != 0, f"accepted silently; stdout: {out[-500:]}"
    assert "Traceback" not in err
    assert expected.lower() in err.lower(), err[-1500:]
    # The problem is reported on one line, not buried in a dump.
    assert len([line for line in err.splitlines() if "error" in line.lower()]) >= 1
    assert not env["marker"].exists(), "a crafted pickle ran code"


def test_crafted_pickles_never_run(env, tmp_path, capsys):
    """Every door a pickled file could come in through refuses it without unpickling."""
    for argv in (
        ["eval", "{evil_bin}", "--data", "{data}"],
        ["generate", "{evil_bin}"],
        ["convert", "gpt2", "{evil_gpt2}", "{out}"],
        ["convert", "mom", "--from", "{evil_gpt2}", "--config", "K2H2S", "{out}"],
        ["cost", "{evil_bin}"],
        train_argv("{data}", "{out}", "--model.init_from", "{evil_bin}"),
    ):
        code, _, err = run_cli(fill(argv, env, tmp_path / "out"), capsys)
        assert code == 2, err
    assert not env["marker"].exists()
    # The exploit itself works: unpickling it does create the marker.
    torch.load(env["evil_bin"] / "pytorch_model.bin", weights_only=False)
    assert env["marker"].exists()
    env["marker"].unlink()


GOOD: list[tuple[str, list[str], str]] = [
    (
        "eval",
        ["eval", "{gpt}", "--data", "{data}", "--block-size", "16", "--max-batches", "1"],
        "ppl",
    ),
    ("eval-text", ["eval", "{gpt}", "--text", "{text}", "--block-size", "16"], "text"),
    (
        "eval-json",
        [
            "eval",
            "{gpt}",
            "--data",
            "{data}",
            "--block-size",
            "16",
            "--max-batches",
            "1",
            "--json",
            "{out}.json",
        ],
        "ppl",
    ),
    (
        "eval-json-overwrite",
        [
            "eval",
            "{gpt}",
            "--data",
            "{data}",
            "--block-size",
            "16",
            "--max-batches",
            "1",
            "--json",
            "{existing_json}",
            "--overwrite",
        ],
        "ppl",
    ),
    (
        "generate",
        ["generate", "{gpt}", "--prompt", "def ", "--max-new-tokens", "4", "--greedy"],
        "def ",
    ),
    ("generate-sample", ["generate", "{gpt}", "--max-new-tokens", "4", "--top-k", "5"], ""),
    (
        "convert-mom",
        ["convert", "mom", "--from", "{gpt}", "--config", "K1H1", "--chunks", "[1]", "{out}"],
        "converted",
    ),
    ("usage", ["usage", "{mf}", "{data}", "--block-size", "16", "--max-batches", "1"], ""),
    ("cost", ["cost", "{gpt}", "--seq-len", "16", "--batch-size", "1"], ""),
    (
        "usage-overwrite",
        [
            "usage",
            "{mf}",
            "{data}",
            "--block-size",
            "16",
            "--max-batches",
            "1",
            "--out",
            "{existing_json}",
            "--overwrite",
        ],
        "",
    ),
    ("train", train_argv("{data}", "{out}"), "final val loss"),
    ("train-overwrite", train_argv("{data}", "{finished_copy}", "--overwrite"), "final val loss"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_good_invocation_succeeds(argv, expected, env, tmp_path, capsys):
    if "{finished_copy}" in argv:
        shutil.copytree(env["finished"], tmp_path / "finished")
        argv = [a.replace("{finished_copy}", str(tmp_path / "finished")) for a in argv]
    (tmp_path / "eval.json").write_text("{}")
    code, out, err = run_cli(
        fill(argv, {**env, "existing_json": tmp_path / "eval.json"}, tmp_path / "out"), capsys
    )
    assert code == 0, err[-2000:]
    assert expected in out
    assert "Traceback" not in err


def test_subprocess_reports_errors_in_one_line(env, tmp_path):
    """The real entry point (not just main()): exit status 2, one error line, no traceback."""
    import subprocess
    import sys

    cases = [
        (["eval", str(env["bert"]), "--data", str(env["data"])], "'bert' model"),
        (["generate", str(env["gpt"]), "--top-k", "0"], "top_k must be >= 1"),
    ]
    for argv, expected in cases:
        done = subprocess.run(
            [sys.executable, "-m", "modformer.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("modformer ")]
        assert len(errors) == 1 and expected in errors[0], done.stderr

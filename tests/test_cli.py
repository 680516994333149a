"""The `modformer` command end to end on tiny data: train, eval, generate, convert."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from modformer.cli import main


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    code = main(
        [
            "train",
            "--data.dir",
            str(tiny_data_dir),
            "--data.block_size",
            "32",
            "--out_dir",
            str(out),
            "--max_steps",
            "30",
            "--batch_size",
            "4",
            "--eval_batches",
            "2",
            "--progress",
            "false",
            "--model.overrides",
            "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
        ]
    )
    assert code == 0
    return out


def test_eval_on_split_per_domain_and_text(trained_run, tiny_data_dir, tmp_path, capsys):
    js = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(trained_run),
                "--data",
                str(tiny_data_dir),
                "--per-domain",
                "--block-size",
                "32",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    results = json.loads(js.read_text())
    assert set(results) == {"all", "synthetic"}
    assert results["all"]["loss"] == pytest.approx(results["synthetic"]["loss"])
    from modformer.eval.lm import evaluate_split
    from modformer.models.loading import load_model

    direct = evaluate_split(load_model(trained_run), str(tiny_data_dir), block_size=32)
    assert results["all"]["loss"] == pytest.approx(direct["all"]["loss"], rel=1e-6)
    text = tmp_path / "t.txt"
    text.write_text("def alpha_beta(x): return x + gamma\n" * 20)
    assert (
        main(["eval", str(trained_run / "model"), "--text", str(text), "--block-size", "32"]) == 0
    )
    out = capsys.readouterr().out
    assert "text" in out and "ppl" in out


def test_generate_prints_the_greedy_continuation(trained_run, capsys):
    from modformer.generation import argmax_decode
    from modformer.models.loading import load_model, load_tokenizer

    argv = ["generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "10", "--greedy"]
    assert main(argv) == 0
    model, tokenizer = load_model(trained_run), load_tokenizer(trained_run)
    prompt = tokenizer("def ", return_tensors="pt").input_ids
    expected = tokenizer.decode(argmax_decode(model, prompt, 10)[0, prompt.shape[1] :])
    assert capsys.readouterr().out == "def " + expected + "\n"


def test_generate_and_eval_errors_are_clear(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "holds no saved model" in capsys.readouterr().err


def test_convert_gpt2_cli(tmp_path, capsys):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    ).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    assert main(["convert", "gpt2", str(tmp_path / "gpt2"), str(tmp_path / "ours")]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["convert", "gpt2", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cmd",
    [
        "prepare",
        "train",
        "eval",
        "generate",
        "convert",
        "finetune",
        "lm-eval",
        "plot-curves",
        "cost",
        "usage",
        "routing-report",
        "sweep",
        "prune",
        "prune-workflow",
        "extend",
        "forgetting",
        "export",
        "demo",
        "reproduce",
    ],
)
def test_every_subcommand_has_help(cmd, capsys):
    import argparse

    from modformer.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: modformer {cmd}")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[cmd]._actions:  # every option and argument is described
        if action.option_strings:
            name = action.option_strings[-1]
        elif action.metavar is None and action.choices is not None:  # shown as {a,b}
            name = "{" + ",".join(map(str, action.choices)) + "}"
        else:
            name = action.metavar or action.dest
        assert str(name) in out, f"{cmd} --help does not mention {name}"


def test_every_subcommand_and_convert_kind_runs_a_function():
    import argparse

    from modformer.cli import MOUNTED, SUBCOMMANDS, _function, build_parser
    from modformer.commands.convert import RUNS

    def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    commands = subparsers(build_parser())
    assert len(commands.choices) == len(SUBCOMMANDS) == len(MOUNTED)
    for name, module, _, run, _, _ in MOUNTED:  # imports every command module
        assert callable(_function(module, run)), name
        assert commands.choices[name].get_default("func") is not None, name
    assert set(subparsers(commands.choices["convert"]).choices) == set(RUNS)


def test_convert_mom_cli(tiny_data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from modformer.models.gpt import GPTConfig, GPTForCausalLM
    from modformer.models.mom import MoMForCausalLM
    from modformer.train.checkpoint import save_model_files

    src = tmp_path / "gpt"
    gpt = GPTForCausalLM(GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_head=2, n_layer=2))
    save_model_files(gpt, src, tiny_data_dir / "tokenizer")
    assert (
        main(
            [
                "convert",
                "mom",
                "--from",
                str(src),
                "--chunks",
                "[3]",
                "--config",
                "K2H3S",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "layers" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                "mom",
                "--from",
                str(tmp_path / "none"),
                "--config",
                "K2H3S",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                "mom",
                "--from",
                str(src),
                "--chunks",
                "[2]",
                "--config",
                "K9H3S",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "K=9" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    dst = tmp_path / "mom"
    assert (
        main(
            ["convert", "mom", "--from", str(src), "--chunks", "[2]", "--config", "K2H3S", str(dst)]
        )
        == 0
    )
    assert "K2H3S" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert isinstance(model, MoMForCausalLM) and model.config.H == 3
    assert (dst / "tokenizer.json").is_file()
    card = (dst / "README.md").read_text()  # the model card names how it was made
    assert "- made by: convert\n" in card and f"- from: `{src}`\n" in card
    command = f"modformer convert mom --from {src} --chunks '[2]' --config K2H3S {dst}"
    assert f"- command: `{command}`\n" in card


def test_saved_models_carry_the_tokenizers_special_ids(trained_run, tiny_data_dir, tmp_path):
    """Defect 2: config.json and generation_config.json name the tokenizer's eos/pad ids
    (the trainer's final model, its checkpoints, and a converted model)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_data_dir / "tokenizer")
    assert tokenizer.eos_token_id is not None
    checkpoints = sorted((trained_run / "checkpoints").glob("step_*/model"))
    assert checkpoints
    assert (
        main(
            [
                "convert",
                "mom",
                "--from",
                str(trained_run),
                "--chunks",
                "[1]",
                "--config",
                "K1H1S",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    for model_dir in [trained_run / "model", checkpoints[-1], tmp_path / "m"]:
        config = json.loads((model_dir / "config.json").read_text())
        generation = json.loads((model_dir / "generation_config.json").read_text())
        for saved in (config, generation):
            assert saved["eos_token_id"] == tokenizer.eos_token_id, model_dir
            assert saved["pad_token_id"] == tokenizer.pad_token_id, model_dir

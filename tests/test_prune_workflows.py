"""The prune command, the two prune/fine-tune workflows (ModuleFormer sec. 5.3) with
--domains, and `modformer prune-workflow`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_text_inputs
from modformer.analysis.usage import UsageStats, collect_usage
from modformer.cli import main
from modformer.cli_args import add_prune_arguments, add_prune_workflow_arguments
from modformer.commands.prune import run_prune, run_prune_workflow
from modformer.data.corpus import DataError
from modformer.data.dataset import TokenDataset
from modformer.data.prepare import prepare
from modformer.experiments.prune_workflows import (
    finetune_then_prune,
    prune_then_finetune,
    usage_on_domains,
)
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.surgery import SurgeryError
from modformer.train.checkpoint import atomic_save_model


def saved_model(tmp_path, data_dir, name="model", **overrides):
    torch.manual_seed(0)
    vocab = TokenDataset(data_dir, "train").vocab_size
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=vocab, n_layer=2, **overrides)
    model = ModuleFormerForCausalLM(config).eval()
    return atomic_save_model(model, tmp_path / name, tokenizer_dir=data_dir / "tokenizer")


@pytest.fixture(scope="module")
def two_domain_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune_two_domains")
    inputs = [
        f"{name}={make_text_inputs(root / name, n_docs=20, seed=i)}"
        for i, name in enumerate(("python", "prose"))
    ]
    prepare(root / "prepared", inputs=inputs, tokenizer="byte", progress=False)
    return root / "prepared"


def token_batches(vocab: int, n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 32), generator=g) for _ in range(n)]


def kept_by_key(report: dict) -> dict[str, list[int]]:
    return {pool["key"]: pool["kept"] for pool in report["pools"]}


def prune_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    return parser.parse_args(argv)


def workflow_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_prune_workflow_arguments(parser)
    return parser.parse_args(argv)


def test_prune_command(tmp_path, tiny_data_dir, capsys):
    model_dir = saved_model(tmp_path, tiny_data_dir)
    out = tmp_path / "pruned"
    report = run_prune(
        prune_args(str(model_dir), str(out), "--data", str(tiny_data_dir), "--threshold", "0.6")
    )
    printed = capsys.readouterr().out
    assert f"{report['params_before']:,} -> {report['params_after']:,}" in printed
    assert report["params_after"] < report["params_before"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]
    assert json.loads((out / "prune_report.json").read_text()) == report
    assert (out / "tokenizer.json").is_file()
    for pool in report["pools"]:
        assert all(pool["frequencies"][i] >= 0.6 for i in pool["kept"]) or pool["raised_to_top_k"]
        assert all(pool["frequencies"][i] < 0.6 for i in pool["removed"])

    # The same from saved usage statistics.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    usage = collect_usage(model, token_batches(model.config.vocab_size))
    usage.save(tmp_path / "usage.json")
    again = run_prune(
        prune_args(
            str(model_dir),
            str(tmp_path / "p2"),
            "--usage",
            str(tmp_path / "usage.json"),
            "--threshold",
            "0.6",
        )
    )
    assert again["pools"][0]["frequencies"] == pytest.approx(
        UsageStats.load(tmp_path / "usage.json").module_frequencies()["layer0/attn"].tolist(),
        abs=1e-6,
    )

    with pytest.raises(SurgeryError, match="threshold must be in"):
        run_prune(prune_args(str(model_dir), str(out), "--data", "x", "--threshold", "2"))


def test_prune_command_rejects_data_of_another_tokenizer(tmp_path, tiny_data_dir):
    model_dir = saved_model(tmp_path, tiny_data_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    tokenizer["added_tokens"] = tokenizer.get("added_tokens", []) + [
        {"id": 999, "content": "<other>", "special": True}
    ]
    tokenizer_file.write_text(json.dumps(tokenizer))
    with pytest.raises(DataError, match="different tokenizer"):
        run_prune(
            prune_args(
                str(model_dir),
                str(tmp_path / "o"),
                "--data",
                str(tiny_data_dir),
                "--threshold",
                "0.5",
            )
        )
    assert not (tmp_path / "o").exists()


TRAIN_SETTINGS = [
    "batch_size=8",
    "data.block_size=32",
    "eval_batches=1",
    "progress=false",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "ckpt_interval=0",
    "eval_interval=0",
]


def usage_entropy(report: dict) -> float:
    """Mean over pools of the entropy of the sum-normalised frequencies (nats)."""
    entropies = []
    for pool in report["pools"]:
        p = torch.tensor(pool["frequencies"])
        p = p / p.sum()
        entropies.append(float(-(p * p.clamp_min(1e-12).log()).sum()))
    return sum(entropies) / len(entropies)


def test_load_concentration_workflow_concentrates_usage(tmp_path, tiny_data_dir):
    model_dir = saved_model(tmp_path, tiny_data_dir, aux_loss_type="none")
    settings = [*TRAIN_SETTINGS, "max_steps=30"]
    results = {}
    for weight in (0.0, 1.0):
        results[weight] = finetune_then_prune(
            model_dir,
            tiny_data_dir,
            [0.05, 0.3],
            tmp_path / f"lc{weight}",
            load_concentration_weight=weight,
            train_settings=settings,
            block_size=32,
            max_batches=4,
        )
    without, with_lc = (results[w]["prune"][0.05] for w in (0.0, 1.0))
    # Measured: 1.45 nats without, 0.87 with (uniform over 4 and 8 experts: 1.39 / 2.08).
    assert usage_entropy(with_lc) < usage_entropy(without) - 0.2
    assert with_lc["params_after"] < without["params_after"]
    finetuned = AutoModelForCausalLM.from_pretrained(tmp_path / "lc1.0" / "finetuned" / "model")
    assert finetuned.config.load_concentration_weight == 1.0
    # A higher threshold never keeps more.
    reports = results[1.0]["prune"]
    assert reports[0.3]["params_after"] <= reports[0.05]["params_after"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lc1.0" / "pruned_tau0.3")


def test_prune_then_finetune_workflow(tmp_path, tiny_data_dir):
    model_dir = saved_model(tmp_path, tiny_data_dir)
    result = prune_then_finetune(
        model_dir,
        tiny_data_dir,
        0.6,
        tmp_path / "pf",
        train_settings=[*TRAIN_SETTINGS, "max_steps=3"],
        block_size=32,
        max_batches=4,
    )
    finetuned = AutoModelForCausalLM.from_pretrained(tmp_path / "pf" / "finetuned" / "model")
    kept = kept_by_key(result["prune"])
    assert finetuned.config.ffd_experts_per_layer == [len(kept[f"layer{i}/ffn"]) for i in range(2)]
    assert result["train"]["params"] == result["prune"]["params_after"]
    assert result["prune"]["params_after"] < result["prune"]["params_before"]


def trained_domains(run_dir) -> list[str] | None:
    """The data.domains a training run was configured with (from its final checkpoint)."""
    (state,) = run_dir.glob("checkpoints/step_*/trainer_state.json")
    return json.loads(state.read_text())["state"]["config"]["data"]["domains"]


def test_usage_on_domains_counts_only_those_domains(tmp_path, two_domain_data):
    model_dir = saved_model(tmp_path, two_domain_data)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    python = usage_on_domains(model_dir, two_domain_data, "val", 32, domains=["python"])
    windows = TokenDataset(two_domain_data, "val").iter_sequential(32, 8, domain="python")
    expected = collect_usage(model, windows)
    assert set(python.per_domain) == {"python"}
    assert python.tokens == expected.tokens
    for key, counts in expected.counts.items():
        assert torch.equal(python.counts[key], counts), key
    everything = usage_on_domains(model, two_domain_data, "val", 32)
    assert set(everything.per_domain) == {"python", "prose"}
    assert python.tokens < everything.tokens
    with pytest.raises(DataError, match="unknown domain"):
        usage_on_domains(model, two_domain_data, "val", 32, domains=["rust"])
    with pytest.raises(SurgeryError, match="max_batches must be >= 1"):
        usage_on_domains(model, two_domain_data, "val", 32, max_batches=0, domains=["python"])


FAST = ["--set", "max_steps=2", "--set", "batch_size=4", "--set", "data.block_size=32",
        "--set", "eval_batches=1", "--set", "progress=false", "--set", "eval_interval=0"]  # fmt: skip


def test_prune_workflow_command_finetune_then_prune_on_a_domain(tmp_path, two_domain_data):
    model_dir = saved_model(tmp_path, two_domain_data)
    out = tmp_path / "fp"
    argv = ["prune-workflow", str(model_dir), str(out), "--data", str(two_domain_data),
            "--workflow", "finetune-then-prune", "--thresholds", "0.3,0.9",
            "--domains", "python", "--load-concentration-weight", "0.5",
            "--block-size", "32", *FAST]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["load_concentration_weight"] == 0.5 and summary["domains"] == ["python"]
    assert [p["threshold"] for p in summary["points"]] == [0.3, 0.9]
    assert trained_domains(out / "finetuned") == ["python"]
    finetuned = AutoModelForCausalLM.from_pretrained(out / "finetuned" / "model")
    assert finetuned.config.load_concentration_weight == 0.5
    assert set(UsageStats.load(out / "usage.json").per_domain) == {"python"}
    ratios = [p["params_ratio"] for p in summary["points"]]
    assert ratios[1] <= ratios[0] < 1.0  # a higher threshold never keeps more
    for point in summary["points"]:
        pruned = AutoModelForCausalLM.from_pretrained(out / f"pruned_tau{point['threshold']:g}")
        assert pruned.num_parameters() == point["report"]["params_after"]
    assert main(argv) == 2  # the output exists: refused without --overwrite


def test_prune_workflow_command_prune_then_finetune_on_a_domain(tmp_path, two_domain_data):
    model_dir = saved_model(tmp_path, two_domain_data)
    out = tmp_path / "pf"
    argv = ["prune-workflow", str(model_dir), str(out), "--data", str(two_domain_data),
            "--workflow", "prune-then-finetune", "--thresholds", "0.5,0.9",
            "--domains", "python", "--block-size", "32", *FAST]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for point in summary["points"]:
        run = out / f"tau{point['threshold']:g}" / "finetuned"
        assert trained_domains(run) == ["python"]
        finetuned = AutoModelForCausalLM.from_pretrained(run / "model")
        assert finetuned.num_parameters() == point["report"]["params_after"]
        assert point["train"]["params"] == point["report"]["params_after"]
        assert finetuned.config.load_concentration_weight == 0.0
    # Usage was counted once, on python: every point prunes by the same frequencies.
    expected = usage_on_domains(model_dir, two_domain_data, "val", 32, domains=["python"])
    frequencies = expected.module_frequencies("max")
    for point in summary["points"]:
        for pool in point["report"]["pools"]:
            assert pool["frequencies"] == pytest.approx(frequencies[pool["key"]].tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--workflow", "prune-then-finetune", "--load-concentration-weight", "0.1"],
         "applies to finetune-then-prune"),
        (["--workflow", "finetune-then-prune", "--thresholds", "0.3,0.3"], "repeats"),
        (["--workflow", "finetune-then-prune", "--thresholds", "1.5"], "threshold must be in"),
        (["--workflow", "finetune-then-prune", "--domains", "rust"], "unknown domain"),
        (["--workflow", "finetune-then-prune", "--load-concentration-weight", "-1"], ">= 0"),
        (["--workflow", "prune-then-finetune", "--max-batches", "0"], "--max-batches"),
    ],
)  # fmt: skip
def test_prune_workflow_bad_arguments_are_clear_errors(tmp_path, two_domain_data, extra, message):
    model_dir = saved_model(tmp_path, two_domain_data)
    argv = [str(model_dir), str(tmp_path / "out"), "--data", str(two_domain_data)]
    if "--thresholds" not in extra:
        extra = [*extra, "--thresholds", "0.3"]
    with pytest.raises((SurgeryError, DataError), match=message):
        run_prune_workflow(workflow_args(*argv, *extra))
    assert not (tmp_path / "out" / "finetuned").exists()

"""lm-evaluation-harness on saved modformer models: the documented local task through
lm-eval's Python API (checked against our own scoring of the same choices), the
`lm-eval` CLI functions, the remote-code entry point, and bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from modformer.cli_args_models import add_lmeval_arguments  # noqa: E402
from modformer.commands.lmeval import run_lmeval  # noqa: E402
from modformer.eval.lmeval import (  # noqa: E402
    evaluate_lm_eval,
    results_summary,
    write_remote_code,
)
from modformer.models.gpt import GPTConfig, GPTForCausalLM  # noqa: E402
from modformer.train.checkpoint import save_model_files  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "docs" / "lm_eval_task"
TASK = "modformer_python_completion"


@pytest.fixture(scope="module")
def model_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """A saved tiny GPT with its byte tokenizer beside it (as `modformer train` saves).

    Large initial weights spread the log-probabilities, so that no two choices of the
    task score within float rounding of each other (an untrained model at the usual
    init gives every byte ~1/257, and its per-character scores would nearly tie)."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=257, n_positions=128, n_embd=32, n_layer=1, n_head=2, initializer_range=0.5
    )
    model = GPTForCausalLM(config)
    directory = tmp_path_factory.mktemp("lmeval") / "model"
    save_model_files(model, directory, tiny_data_dir / "tokenizer")
    return directory


def task_records() -> list[dict]:
    lines = (TASK_DIR / "python_completion.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


@torch.no_grad()
def our_accuracy(model_dir: Path) -> tuple[float, float]:
    """acc and acc_norm of the local task, computed directly: the choice with the highest
    summed log-probability (acc) or per-character log-probability (acc_norm)."""
    from modformer.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    hits = hits_norm = 0
    records = task_records()
    for record in records:
        scores = []
        # lm-eval moves the context's trailing whitespace into every continuation
        text = record["context"].rstrip()
        moved = record["context"][len(text) :]
        context = tokenizer(text).input_ids
        for choice in record["choices"]:
            continuation = tokenizer(moved + choice).input_ids
            ids = torch.tensor([context + continuation])
            logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, len(context) :]
            scores.append(float(logprobs[len(context) - 1 :].gather(1, targets[:, None]).sum()))
        norm = [s / len(c) for s, c in zip(scores, record["choices"])]
        hits += max(range(4), key=scores.__getitem__) == record["label"]
        hits_norm += max(range(4), key=norm.__getitem__) == record["label"]
    return hits / len(records), hits_norm / len(records)


def test_task_files_are_consistent():
    records = task_records()
    assert len(records) >= 20
    for record in records:
        assert set(record) == {"context", "choices", "label"}
        assert len(record["choices"]) == 4 and len(set(record["choices"])) == 4
        assert 0 <= record["label"] < 4
    # the correct answer is not always in the same place
    assert len({record["label"] for record in records}) == 4
    assert (TASK_DIR / f"{TASK}.yaml").is_file() and (TASK_DIR / "README.md").is_file()


def test_local_task_through_lm_eval_matches_direct_scoring(model_dir):
    results = evaluate_lm_eval(
        model_dir, [TASK], include_paths=[TASK_DIR], include_default_tasks=False, batch_size=4
    )
    metrics = results["results"][TASK]
    acc, acc_norm = our_accuracy(model_dir)
    assert metrics["sample_len"] == len(task_records())
    assert metrics["acc,none"] == pytest.approx(acc)
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm)
    summary = results_summary(results)
    json.dumps(summary)  # JSON-safe
    assert summary["versions"][TASK] == 1.0


def test_cli_writes_results(model_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_lmeval_arguments(parser)
    out = tmp_path / "lm_eval.json"
    args = parser.parse_args(
        [str(model_dir), "--tasks", TASK, "--include-path", str(TASK_DIR), "--no-default-tasks"]
        + ["--limit", "6", "--output", str(out)]
    )
    summary = run_lmeval(args)
    saved = json.loads(out.read_text())
    assert saved["results"][TASK]["sample_len"] == 6
    assert saved == summary
    assert TASK in capsys.readouterr().out  # the results table


def test_bad_input(model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_lm_eval(
            model_dir, ["no_such_task"], include_paths=[TASK_DIR], include_default_tasks=False
        )
    with pytest.raises(ValueError, match="task directory .* does not exist"):
        evaluate_lm_eval(model_dir, [TASK], include_paths=[tmp_path / "none"])
    with pytest.raises(ValueError, match="no tasks given"):
        evaluate_lm_eval(model_dir, [], include_paths=[TASK_DIR])
    bare = tmp_path / "bare"
    GPTForCausalLM(
        GPTConfig(vocab_size=257, n_positions=32, n_embd=16, n_layer=1, n_head=1)
    ).save_pretrained(bare)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        evaluate_lm_eval(bare, [TASK], include_paths=[TASK_DIR])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_lm_eval(tmp_path / "missing", [TASK], include_paths=[TASK_DIR])
    parser = argparse.ArgumentParser()
    add_lmeval_arguments(parser)
    with pytest.raises(ValueError, match="--tasks is required"):
        run_lmeval(parser.parse_args([str(model_dir)]))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a modformer architecture"):
        write_remote_code(foreign)


def _fresh_python(code: str, tmp_path: Path) -> str:
    """Run `code` in a new interpreter that has not imported modformer, offline."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_remote_code_lets_plain_transformers_load_the_model(model_dir, tmp_path):
    """After write_remote_code, AutoModelForCausalLM(trust_remote_code=True) in a process
    that never imported modformer builds the same model (what plain `lm_eval` does)."""
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(model_dir, remote)
    # As an older modformer saved it: no model code, no auto_map.
    for code in remote.glob("*.py"):
        code.unlink()
    config = json.loads((remote / "config.json").read_text())
    del config["auto_map"]
    (remote / "config.json").write_text(json.dumps(config))
    write_remote_code(remote)
    config = json.loads((remote / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt.GPTForCausalLM"
    assert (remote / "modeling_gpt.py").is_file()
    ids = [[1, 2, 3, 4, 5]]
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'modformer' not in sys.modules\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(remote)!r}, trust_remote_code=True)\n"
        f"logits = m(torch.tensor({ids})).logits\n"
        "print(json.dumps([type(m).__name__, logits.tolist()]))\n"
    )
    name, logits = json.loads(_fresh_python(code, tmp_path))
    from modformer.models.loading import load_model

    with torch.no_grad():
        expected = load_model(model_dir)(torch.tensor(ids)).logits
    assert name == "GPTForCausalLM"
    torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_plain_lm_eval_cli_and_module_entry_point(model_dir, tmp_path):
    """The documented commands, end to end, each in a fresh process (~40 s each)."""
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(model_dir, remote)
    write_remote_code(remote)
    common = ["--tasks", TASK, "--include_path", str(TASK_DIR), "--device", "cpu", "--limit", "4"]
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    for command in (
        [str(lm_eval_bin), "--model", "hf"]
        + ["--model_args", f"pretrained={remote},trust_remote_code=True,dtype=float32"],
        [sys.executable, "-m", "modformer.eval.lmeval", "--model", "hf"]
        + ["--model_args", f"pretrained={model_dir},dtype=float32"],
    ):
        done = subprocess.run(
            command + common, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert TASK in done.stdout and "acc" in done.stdout

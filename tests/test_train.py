"""Trainer: configuration, schedule, checkpoints, exact resume after a kill, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modformer.cli import main as cli_main
from modformer.config import ConfigError
from modformer.data.dataset import TokenDataset
from modformer.eval.lm import unigram_loss
from modformer.models.gpt import GPTForCausalLM
from modformer.train import checkpoint as ckpt_lib
from modformer.train.config import TrainConfig, load_train_config
from modformer.train.optim import lr_at, make_optimizer
from modformer.train.trainer import train

TINY_MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}


def tiny_args(data_dir: Path, out_dir: Path, steps: int = 30, **extra) -> list[str]:
    args = [
        f"data.dir={data_dir}",
        "data.block_size=32",
        f"out_dir={out_dir}",
        f"max_steps={steps}",
        "batch_size=4",
        "eval_batches=4",
        "eval_interval=10",
        "log_interval=5",
        "progress=false",
        "threads=1",
        "optim.warmup_steps=5",
        "optim.lr=3e-3",
        f"model.overrides={json.dumps(TINY_MODEL)}",
    ]
    args += [f"{k}={v}" for k, v in extra.items()]
    return args


def test_config_file_overrides_and_errors_name_the_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.01}, "max_steps": 7}))
    cfg = load_train_config(path, ["optim.lr=0.002"], {"batch_size": 3})
    assert (cfg.optim.lr, cfg.max_steps, cfg.batch_size) == (0.002, 7, 3)
    (tmp_path / "c.json").write_text('{"data": {"block_size": 64}}')
    assert load_train_config(tmp_path / "c.json").data.block_size == 64
    with pytest.raises(ConfigError, match=r"unknown setting optim\.lrate; did you mean optim\.lr"):
        load_train_config(None, ["optim.lrate=1"])
    with pytest.raises(ConfigError, match=r"optim\.min_lr must be in \[0, optim\.lr\]"):
        load_train_config(None, ["optim.min_lr=1"])
    with pytest.raises(ConfigError, match="max_steps: expected an integer"):
        load_train_config(None, ["max_steps=many"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2")
    with pytest.raises(ConfigError, match="not valid"):
        load_train_config(tmp_path / "bad.yaml")


def test_model_errors_name_the_field(tiny_data_dir, tmp_path):
    cfg = load_train_config(
        None,
        tiny_args(tiny_data_dir, tmp_path / "r", steps=1)
        + ["model.overrides={n_embd: 30, n_head: 4}"],
    )
    with pytest.raises(ConfigError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        train(cfg)
    cfg = load_train_config(
        None, tiny_args(tiny_data_dir, tmp_path / "r", steps=1) + ["model.preset=gigantic"]
    )
    with pytest.raises(ConfigError, match="unknown preset 'gigantic'"):
        train(cfg)
    cfg = load_train_config(
        None,
        tiny_args(tiny_data_dir, tmp_path / "r", steps=1) + ["model.overrides={vocab_size: 100}"],
    )
    with pytest.raises(ConfigError, match="does not fit the model's vocab_size"):
        train(cfg)


def test_lr_schedule_warmup_cosine_min():
    cfg = load_train_config(
        None, ["max_steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr=0.1"]
    )
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    from modformer.models.gpt import GPTConfig

    model = GPTForCausalLM(GPTConfig(vocab_size=50, n_embd=16, n_head=2, n_layer=1, n_positions=16))
    opt = make_optimizer(model, TrainConfig())
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_all = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_all


def test_training_learns_and_writes_outputs(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_train_config(
        None, tiny_args(tiny_data_dir, out, steps=60, ckpt_interval=20, keep_last=2)
    )
    final = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0  # byte-level synthetic text is easy
    # Context helps: better than the add-one unigram model of the same data (3.0 nats).
    train_tokens = TokenDataset(tiny_data_dir, "train").tokens
    unigram = unigram_loss(train_tokens, TokenDataset(tiny_data_dir, "val").tokens, 256)
    assert final["val_loss"] < unigram - 0.2
    assert all("tokens_per_s" in r for r in records if "loss" in r)
    # keep_last=2: the final checkpoint and the one before it
    assert [p.name for p in ckpt_lib.list_checkpoints(out / "checkpoints")] == [
        "step_000040",
        "step_000060",
    ]
    assert not list((out / "checkpoints").glob(".*tmp*"))
    model = GPTForCausalLM.from_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").is_file()
    assert sum(p.numel() for p in model.parameters()) == final["params"]
    card = (out / "model" / "README.md").read_text()  # the model card
    for line in (
        "- made by: train",
        f"- training data: `{tiny_data_dir}`",
        "- training steps: 60",
        f"- training tokens: {final['tokens_trained']:,}",
        f"- final validation loss: {final['val_loss']:.4f}",
        f"- total parameters: {final['params']:,}",
    ):
        assert line + "\n" in card
    assert "- from:" not in card and "- command:" not in card  # a fresh model, not the CLI


def test_grad_accumulation_matches_larger_batch(tiny_data_dir, tmp_path):
    """3 accumulated micro-batches of 4 take the same steps as one batch of 12: the same
    rows (the global batch is drawn by position), the mean loss, the same update."""
    finals = {}
    for name, extra in (("acc", dict(batch_size=4, grad_accum=3)), ("big", dict(batch_size=12))):
        args = tiny_args(tiny_data_dir, tmp_path / name, steps=3) + [
            f"{k}={v}" for k, v in extra.items()
        ]
        train(load_train_config(None, args))
        finals[name] = GPTForCausalLM.from_pretrained(tmp_path / name / "model").state_dict()
        records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        finals[name + "/first_loss"] = json.loads(records[0])["loss"]
    assert finals["acc/first_loss"] == pytest.approx(finals["big/first_loss"], abs=1e-5)
    for key, value in finals["big"].items():
        torch.testing.assert_close(finals["acc"][key], value, atol=1e-5, rtol=1e-4)


def test_existing_run_needs_resume(tiny_data_dir, tmp_path):
    cfg = load_train_config(None, tiny_args(tiny_data_dir, tmp_path / "r", steps=2))
    train(cfg)
    with pytest.raises(ConfigError, match="pass --resume"):
        train(cfg)
    other = load_train_config(
        None, tiny_args(tiny_data_dir, tmp_path / "r", steps=4) + ["data.block_size=16"]
    )
    with pytest.raises(ConfigError, match="data.block_size was 32"):
        train(other, resume=True)


def test_corrupt_checkpoint_is_a_clear_error(tiny_data_dir, tmp_path):
    cfg = load_train_config(None, tiny_args(tiny_data_dir, tmp_path / "r", steps=2))
    train(cfg)
    state = tmp_path / "r" / "checkpoints" / "step_000002" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    cfg = load_train_config(None, tiny_args(tiny_data_dir, tmp_path / "r", steps=4))
    with pytest.raises(
        ckpt_lib.CheckpointError,
        match=r"no intact checkpoint .*step_000002: trainer_state.safetensors has 100 bytes",
    ):
        train(cfg, resume=True)


def _cli_train(args: list[str], **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "modformer.cli", "train"] + [
        a for kv in args for a in ("--set", kv)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def test_killed_and_resumed_run_ends_like_uninterrupted(tiny_data_dir, tmp_path):
    steps = 40
    ref = _cli_train(tiny_args(tiny_data_dir, tmp_path / "ref", steps, ckpt_interval=5))
    victim = _cli_train(tiny_args(tiny_data_dir, tmp_path / "victim", steps, ckpt_interval=5))
    ckpts = tmp_path / "victim" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step_000015").exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim" / "final.json").exists()
    resumed = _cli_train(tiny_args(tiny_data_dir, tmp_path / "victim", steps, ckpt_interval=5))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 2 and "pass --resume" in out  # refuses to silently restart
    cmd = [sys.executable, "-m", "modformer.cli", "train", "--resume"]
    cmd += [
        a
        for kv in tiny_args(tiny_data_dir, tmp_path / "victim", steps, ckpt_interval=5)
        for a in ("--set", kv)
    ]
    done = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-2000:]
    a = json.loads((tmp_path / "ref" / "final.json").read_text())
    b = json.loads((tmp_path / "victim" / "final.json").read_text())
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)
    ma = GPTForCausalLM.from_pretrained(tmp_path / "ref" / "model")
    mb = GPTForCausalLM.from_pretrained(tmp_path / "victim" / "model")
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)
    # The metrics file has each step once, even though steps after the checkpoint ran twice.
    steps_logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "victim" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line and "val" not in line
    ]
    assert steps_logged == sorted(set(steps_logged))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes_stay_in_sync(tiny_data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),  # a fixed port collides with another suite running at once
        "-m",
        "modformer",  # torchrun -m modformer train (src/modformer/__main__.py)
        "train",
    ]
    cmd += [
        a for kv in tiny_args(tiny_data_dir, out, steps=12, ckpt_interval=6) for a in ("--set", kv)
    ]
    done = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["ranks_in_sync"] is True
    # Rank 0 alone prints: each log line and the final line once, not once per rank.
    assert done.stdout.count("final val loss") == 1
    assert done.stdout.count("step 10/12  loss") == 1
    assert done.stdout.count("step 10/12  val loss") == 1
    # 2 ranks x 4 sequences x 32 tokens per step
    assert final["tokens_trained"] == 12 * 2 * 4 * 32
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    assert steps == [5, 10, 12]  # written once (rank 0 only), not once per rank
    assert [p.name for p in ckpt_lib.list_checkpoints(out / "checkpoints")] == [
        "step_000006",
        "step_000012",
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        ".modformer.lock",  # rank 0's run lock (released; only rank 0 takes it)
        "checkpoints",
        "final.json",
        "metrics.jsonl",
        "model",
    ]


def test_cli_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    for option in [
        "--optim.lr",
        "--data.block_size",
        "--grad_accum",
        "--precision",
        "--resume",
        "--set",
        "--model.arch",
    ]:
        assert option in text
    assert "peak learning rate" in text


def test_cli_reports_bad_config_without_traceback(tiny_data_dir, tmp_path, capsys):
    code = cli_main(["train", "--set", "optim.lr=-1", "--set", f"data.dir={tiny_data_dir}"])
    assert code == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err


def test_misspelt_model_override_is_rejected(tiny_data_dir, tmp_path):
    cfg = load_train_config(
        None, tiny_args(tiny_data_dir, tmp_path / "r", steps=1) + ["model.overrides={n_embdd: 64}"]
    )
    with pytest.raises(ConfigError, match=r"n_embdd \(did you mean n_embd\?\)"):
        train(cfg)


def test_without_a_progress_bar_training_prints_lines(tiny_data_dir, tmp_path, capsys):
    """Defect 7: progress=false (or stderr not a terminal) prints step, loss, lr,
    tokens/s and ETA every log_interval steps, and the validation loss at each evaluation."""
    import re

    from modformer.train.metrics import format_duration

    cfg = load_train_config(None, tiny_args(tiny_data_dir, tmp_path / "run", steps=20))
    train(cfg)
    lines = capsys.readouterr().out.splitlines()
    progress = [
        line
        for line in lines
        if re.fullmatch(
            r"step \d+/20  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d+  tokens/s [\d,]+  ETA \S+", line
        )
    ]
    assert [int(line.split()[1].split("/")[0]) for line in progress] == [5, 10, 15, 20]
    assert progress[-1].endswith("ETA 0s")
    val = [line for line in lines if "val loss" in line]
    assert [line.split()[1] for line in val] == ["10/20", "20/20"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_10 = next(m["val_loss"] for m in metrics if m.get("step") == 10 and "val_loss" in m)
    assert f"val loss {val_10:.4f}" in val[0]
    assert [format_duration(s) for s in (0.4, 42, 187, 3900)] == ["0s", "42s", "3m07s", "1h05m"]

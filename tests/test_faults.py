"""Fault injection on training runs: corrupt checkpoints, kills during writes, a full disk,
non-finite training, concurrent runs and overwrites. Nothing may be lost, executed or
accepted silently; every failure is one clear error."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modformer.cli import main
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.train import checkpoint as ckpt_lib
from modformer.train.config import load_train_config
from modformer.train.trainer import NonFiniteError, train
from modformer.utils import DirectoryLock

TINY = '{"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}'


def settings(data: Path, out: Path, steps: int, **extra) -> list[str]:
    values = {
        "data.dir": data,
        "out_dir": out,
        "data.block_size": 16,
        "batch_size": 2,
        "max_steps": steps,
        "eval_batches": 1,
        "eval_interval": 0,
        "ckpt_interval": 2,
        "keep_last": 3,
        "log_interval": 1,
        "progress": "false",
        "threads": 1,
        "optim.warmup_steps": 1,
        "model.overrides": TINY,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def cli(data: Path, out: Path, steps: int, *flags: str, **extra) -> list[str]:
    argv = ["train", *flags]
    for kv in settings(data, out, steps, **extra):
        argv += ["--set", kv]
    return argv


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


@pytest.fixture(scope="module")
def base_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4; copy it before changing it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train(load_train_config(None, settings(tiny_data_dir, out, 4)))
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base, dest)
    return dest


def test_checkpoint_format_is_safetensors_json_and_manifest(base_run):
    ckpt = base_run / "checkpoints" / "step_000004"
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"trainer_state.safetensors", "trainer_state.json", "manifest.json"} <= names
    assert "model/model.safetensors" in names and "model/manifest.json" in names
    assert not any(name.endswith((".pt", ".bin", ".pkl")) for name in names)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    ckpt_lib.verify_checkpoint(ckpt)
    state = ckpt_lib.load_trainer_state(ckpt)
    assert state["step"] == 4 and state["config"]["max_steps"] == 4
    assert isinstance(state["rng"][0]["python"], tuple)  # random.setstate needs a tuple
    assert set(state["optimizer"]["state"]) == set(range(len(state["optimizer"]["state"])))
    ckpt_lib.verify_manifest(base_run / "model")  # the final model has one too


def test_trainer_state_round_trips_exactly(tmp_path):
    import numpy as np

    state = {
        "t": torch.arange(6, dtype=torch.float32).view(2, 3),
        "by_index": {0: {"m": torch.ones(2)}, 7: {"m": torch.zeros(1)}},
        "tup": (3, (1, 2), None, 0.5),
        "np": np.arange(5, dtype=np.uint32),
        "nan": float("nan"),
        "nested": [{"__tensor__": "not a reference"}],
    }
    ckpt_lib.save_trainer_state(state, tmp_path)
    back = ckpt_lib.read_trainer_state(tmp_path)
    torch.testing.assert_close(back["t"], state["t"])
    assert set(back["by_index"]) == {0, 7}
    assert back["tup"] == (3, (1, 2), None, 0.5)
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert back["nan"] != back["nan"]
    assert back["nested"] == [{"__tensor__": "not a reference"}]
    with pytest.raises(TypeError, match="cannot store a object"):
        ckpt_lib.save_trainer_state({"x": object()}, tmp_path)


def _exploit(path: Path, marker: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"optimizer": Exploit()}, path)


def test_crafted_trainer_state_pickle_never_runs(base_run, tiny_data_dir, tmp_path, capsys):
    run_dir = copy_run(base_run, tmp_path)
    marker = tmp_path / "PWNED"
    # 1. Beside an intact checkpoint it is simply never read.
    _exploit(run_dir / "checkpoints" / "step_000004" / "trainer_state.pt", marker)
    # 2. As the whole trainer state of an older-format checkpoint it is refused by name.
    legacy = run_dir / "checkpoints" / "step_000002"
    for name in ("trainer_state.safetensors", "trainer_state.json", "manifest.json"):
        (legacy / name).unlink()
    _exploit(legacy / "trainer_state.pt", marker)
    with pytest.raises(ckpt_lib.CheckpointError, match="never loaded because unpickling"):
        ckpt_lib.load_trainer_state(legacy)
    code, err = run(cli(tiny_data_dir, run_dir, 6, "--resume"), capsys)
    assert code == 0, err
    assert not marker.exists()
    (run_dir / "checkpoints" / "step_000006").rename(tmp_path / "aside")
    (run_dir / "checkpoints" / "step_000004.corrupt").mkdir()  # no effect: never listed
    shutil.rmtree(run_dir / "checkpoints" / "step_000004")
    code, err = run(cli(tiny_data_dir, run_dir, 6, "--resume"), capsys)
    assert code == 2 and "never loaded because unpickling" in err and "step_000002" in err
    assert not marker.exists()


def _flip_last_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped-weights": lambda c: _flip_last_bytes(c / "model" / "model.safetensors"),
    "truncated-weights": lambda c: (c / "model" / "model.safetensors").write_bytes(
        (c / "model" / "model.safetensors").read_bytes()[:100]
    ),
    "empty-weights": lambda c: (c / "model" / "model.safetensors").write_bytes(b""),
    "bad-header": lambda c: (c / "model" / "model.safetensors").write_bytes(
        b"\xff" * 8 + (c / "model" / "model.safetensors").read_bytes()[8:]
    ),
    "deleted-model-dir": lambda c: shutil.rmtree(c / "model"),
    "flipped-state": lambda c: _flip_last_bytes(c / "trainer_state.safetensors"),
    "edited-state-json": lambda c: (c / "trainer_state.json").write_text(
        (c / "trainer_state.json").read_text().replace('"step": 4', '"step": 3')
    ),
    "no-manifest": lambda c: (c / "manifest.json").unlink(),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_newest_intact(
    kind, base_run, tiny_data_dir, tmp_path, caplog
):
    run_dir = copy_run(base_run, tmp_path)
    latest = run_dir / "checkpoints" / "step_000004"
    CORRUPTIONS[kind](latest)
    with pytest.raises(ckpt_lib.CheckpointError, match="step_000004"):
        ckpt_lib.verify_checkpoint(latest)
    cfg = load_train_config(None, settings(tiny_data_dir, run_dir, 6))
    with caplog.at_level(logging.WARNING, logger="modformer.checkpoint"):
        final = train(cfg, resume=True)
    assert final["step"] == 6
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step_000004" in warning and "resume from" in warning and "step_000002" in warning
    assert (run_dir / "checkpoints" / "step_000004.corrupt").is_dir()  # kept for inspection
    # Resuming from step 2 redid steps 3-6: the metrics hold each step once.
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line and "val_loss" not in line
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_from_fallback_matches_uninterrupted_run(base_run, tiny_data_dir, tmp_path):
    """Falling back is exact: the run ends as one resumed from step 2 on purpose."""
    ref = tmp_path / "ref"
    shutil.copytree(base_run, ref)
    shutil.rmtree(ref / "checkpoints" / "step_000004")  # resumes from step 2 by design
    train(load_train_config(None, settings(tiny_data_dir, ref, 6)), resume=True)
    run_dir = copy_run(base_run, tmp_path)
    _flip_last_bytes(run_dir / "checkpoints" / "step_000004" / "model" / "model.safetensors")
    train(load_train_config(None, settings(tiny_data_dir, run_dir, 6)), resume=True)
    a = GPTForCausalLM.from_pretrained(ref / "model")
    b = GPTForCausalLM.from_pretrained(run_dir / "model")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=name)


def test_every_checkpoint_broken_is_an_error_naming_each(base_run, tiny_data_dir, tmp_path, capsys):
    run_dir = copy_run(base_run, tmp_path)
    for step in ("step_000002", "step_000004"):
        _flip_last_bytes(run_dir / "checkpoints" / step / "model" / "model.safetensors")
    code, err = run(cli(tiny_data_dir, run_dir, 6, "--resume"), capsys)
    assert code == 2
    assert "no intact checkpoint" in err and "step_000002" in err and "step_000004" in err
    assert (run_dir / "checkpoints" / "step_000004").is_dir()  # nothing moved


def test_checkpoint_of_another_shape_on_resume(base_run, tiny_data_dir, tmp_path, capsys):
    run_dir = copy_run(base_run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_000004"
    other = GPTForCausalLM(
        GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_head=2, n_layer=1)
    )
    shutil.rmtree(ckpt / "model")
    ckpt_lib.save_model_files(other, ckpt / "model")
    ckpt_lib.write_manifest(ckpt)  # a consistent checkpoint, just not of this model
    code, err = run(cli(tiny_data_dir, run_dir, 6, "--resume"), capsys)
    assert code == 2 and "does not fit this run's model" in err and "step_000004" in err


def test_stale_temp_dirs_are_cleaned_at_start(base_run, tiny_data_dir, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    stale = [
        run_dir / "checkpoints" / ".step_000006.tmp-abc123",
        run_dir / "checkpoints" / ".step_000004.old-999",
        run_dir / ".model.tmp-xyz",
    ]
    for path in stale:
        (path / "model").mkdir(parents=True)
        (path / "model" / "model.safetensors").write_bytes(b"partial")
    train(load_train_config(None, settings(tiny_data_dir, run_dir, 5)), resume=True)
    assert not any(path.exists() for path in stale)


def test_interrupted_checkpoint_write_leaves_the_previous_one(
    base_run, tiny_data_dir, tmp_path, monkeypatch
):
    """A kill (here: KeyboardInterrupt) in the middle of writing a checkpoint removes the
    partial one; the previous checkpoint stays intact and the run resumes from it."""
    run_dir = copy_run(base_run, tmp_path)
    real = ckpt_lib.save_trainer_state

    def interrupted(state, directory):
        real(state, directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_lib, "save_trainer_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(load_train_config(None, settings(tiny_data_dir, run_dir, 8)), resume=True)
    monkeypatch.setattr(ckpt_lib, "save_trainer_state", real)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000004"]
    ckpt_lib.verify_checkpoint(run_dir / "checkpoints" / "step_000004")
    final = train(load_train_config(None, settings(tiny_data_dir, run_dir, 8)), resume=True)
    assert final["step"] == 8


def test_disk_full_while_writing_a_checkpoint(
    base_run, tiny_data_dir, tmp_path, monkeypatch, capsys
):
    run_dir = copy_run(base_run, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "trainer_state.safetensors")

    monkeypatch.setattr(ckpt_lib, "save_file", full)
    code, err = run(cli(tiny_data_dir, run_dir, 8, "--resume"), capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1
    assert "no space left on the device while writing checkpoint" in lines[0]
    assert "step_000006" in lines[0] and "step_000004, is intact" in lines[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
    ]


def test_disk_full_and_out_of_memory_elsewhere_are_one_line(env_like_model, monkeypatch, capsys):
    import modformer.eval.lm as lm

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")

    monkeypatch.setattr(lm, "evaluate_batches", oom)
    model, data = env_like_model
    code, err = run(["eval", str(model), "--data", str(data), "--block-size", "16"], capsys)
    assert code == 2 and "out of memory; lower the batch size" in err

    def cpu_oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB")

    monkeypatch.setattr(lm, "evaluate_batches", cpu_oom)
    code, err = run(["eval", str(model), "--data", str(data), "--block-size", "16"], capsys)
    assert code == 2 and "out of memory" in err
    monkeypatch.undo()

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/results.json")

    monkeypatch.setattr("modformer.utils.atomic_write_text", enospc)
    code, err = run(
        [
            "eval",
            str(model),
            "--data",
            str(data),
            "--block-size",
            "16",
            "--max-batches",
            "1",
            "--json",
            str(model.parent / "r.json"),
        ],
        capsys,
    )
    assert code == 2 and "no space left on the device (/x/results.json)" in err

    def bug(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(lm, "evaluate_batches", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):  # bugs keep their traceback
        main(["eval", str(model), "--data", str(data), "--block-size", "16"])


@pytest.fixture
def env_like_model(tiny_data_dir, tmp_path) -> tuple[Path, Path]:
    model = GPTForCausalLM(
        GPTConfig(vocab_size=257, n_positions=64, n_embd=16, n_head=2, n_layer=1)
    )
    ckpt_lib.atomic_save_model(model, tmp_path / "m", tiny_data_dir / "tokenizer")
    return tmp_path / "m", tiny_data_dir


# ---- non-finite training ---------------------------------------------------------------


def test_diverging_run_stops_and_saves_no_model(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    code, err = run(cli(tiny_data_dir, out, 30, **{"optim.lr": "1e6"}), capsys)
    assert code == 2
    assert "training diverged at step" in err and "optim.lr" in err
    assert not (out / "model").exists() and not (out / "final.json").exists()
    for ckpt in ckpt_lib.list_checkpoints(out / "checkpoints"):  # what was kept is good
        state = ckpt_lib.load_trainer_state(ckpt)
        for tensor in state["optimizer"]["state"][0].values():
            assert torch.isfinite(tensor).all()


class NaNAtCall:
    """Patch the model's forward so that training call `n` (1-based) returns a NaN loss."""

    def __init__(self, monkeypatch, n: int) -> None:
        self.calls, self.n = 0, n
        real = GPTForCausalLM.forward

        def forward(model, *args, **kwargs):
            out = real(model, *args, **kwargs)
            if model.training:
                self.calls += 1
                if self.calls == self.n:
                    out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(GPTForCausalLM, "forward", forward)


def test_nonfinite_loss_stops_at_that_step_keeping_the_last_checkpoint(
    tiny_data_dir, tmp_path, monkeypatch
):
    NaNAtCall(monkeypatch, 5)
    out = tmp_path / "r"
    with pytest.raises(NonFiniteError, match=r"step 5: loss nan.*step_000004"):
        train(load_train_config(None, settings(tiny_data_dir, out, 8)))
    assert [p.name for p in ckpt_lib.list_checkpoints(out / "checkpoints")][-1] == "step_000004"
    assert not (out / "model").exists()
    # The cause gone, --resume continues from the last good checkpoint.
    monkeypatch.undo()
    final = train(load_train_config(None, settings(tiny_data_dir, out, 8)), resume=True)
    assert final["step"] == 8


def test_nonfinite_skip_skips_only_that_update(tiny_data_dir, tmp_path, monkeypatch):
    NaNAtCall(monkeypatch, 3)
    out = tmp_path / "r"
    final = train(load_train_config(None, settings(tiny_data_dir, out, 6, nonfinite="skip")))
    assert final["skipped_steps"] == 1
    model = GPTForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert final["val_loss"] == final["val_loss"]


def test_skip_never_saves_a_broken_final_model(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    code, err = run(cli(tiny_data_dir, out, 12, **{"optim.lr": "1e6", "nonfinite": "skip"}), capsys)
    if code == 0:  # the skipped updates kept it finite: then the model must be finite
        model = GPTForCausalLM.from_pretrained(out / "model")
        assert all(torch.isfinite(p).all() for p in model.parameters())
    else:
        assert code == 2 and "was not saved" in err
        assert not (out / "model").exists()


# ---- concurrent runs and overwrites ------------------------------------------------------


def test_second_run_in_a_locked_out_dir_is_refused(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    with DirectoryLock(out, "training run"):
        code, err = run(cli(tiny_data_dir, out, 2), capsys)
        assert code == 2
        assert f"is in use by another training run (pid {os.getpid()})" in err
    assert not (out / "metrics.jsonl").exists()
    code, err = run(cli(tiny_data_dir, out, 2), capsys)  # released: the run goes ahead
    assert code == 0, err


def test_concurrent_processes_cannot_share_an_out_dir(tiny_data_dir, tmp_path, capsys):
    """A second run (here in this process) while another process trains in out_dir."""
    from modformer.utils import LOCK_FILE

    out = tmp_path / "r"
    argv = cli(tiny_data_dir, out, 100000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "modformer.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        lock = out / LOCK_FILE
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        code, err = run(argv, capsys)
        assert code == 2
        assert f"in use by another training run (pid {first.pid})" in err
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder: a killed run leaves no stale lock.
    with DirectoryLock(out):
        pass


def test_lock_without_fcntl_uses_exclusive_create_and_takes_over_stale_locks(tmp_path, monkeypatch):
    import modformer.utils as utils

    monkeypatch.setattr(utils, "fcntl", None)
    lock = DirectoryLock(tmp_path, "training run").acquire()
    with pytest.raises(Exception, match=f"in use by another training run \\(pid {os.getpid()}\\)"):
        DirectoryLock(tmp_path, "training run").acquire()
    lock.release()
    assert not (tmp_path / utils.LOCK_FILE).exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / utils.LOCK_FILE).write_text(dead.stdout)  # a holder that no longer runs
    DirectoryLock(tmp_path).acquire().release()


def test_finished_run_is_not_replaced_without_overwrite(base_run, tiny_data_dir, tmp_path, capsys):
    run_dir = copy_run(base_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")  # a finished run kept without its checkpoints
    metrics = (run_dir / "metrics.jsonl").read_text()
    weights = (run_dir / "model" / "model.safetensors").read_bytes()
    for flags in ((), ("--resume",)):
        code, err = run(cli(tiny_data_dir, run_dir, 4, *flags, seed=7), capsys)
        assert code == 2 and "pass --overwrite" in err
        assert (run_dir / "metrics.jsonl").read_text() == metrics
        assert (run_dir / "model" / "model.safetensors").read_bytes() == weights
    code, err = run(cli(tiny_data_dir, run_dir, 4, "--overwrite", seed=7), capsys)
    assert code == 0, err
    assert (run_dir / "model" / "model.safetensors").read_bytes() != weights


def test_overwrite_replaces_checkpoints_of_an_earlier_run(
    base_run, tiny_data_dir, tmp_path, capsys
):
    run_dir = copy_run(base_run, tmp_path)
    code, err = run(cli(tiny_data_dir, run_dir, 3, seed=5), capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, err = run(cli(tiny_data_dir, run_dir, 3, "--overwrite", seed=5), capsys)
    assert code == 0, err
    names = [p.name for p in ckpt_lib.list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_000002", "step_000003"]  # step_000004 of the old run is gone
    assert (
        ckpt_lib.load_trainer_state(run_dir / "checkpoints" / "step_000003")["config"]["seed"] == 5
    )


def test_torn_last_metrics_line_does_not_block_resume(base_run, tiny_data_dir, tmp_path, caplog):
    run_dir = copy_run(base_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="modformer.train"):
        train(load_train_config(None, settings(tiny_data_dir, run_dir, 6)), resume=True)
    assert "torn write" in caplog.text
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_only_rank_zero_moves_corrupt_checkpoints_aside(base_run, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    root = run_dir / "checkpoints"
    _flip_last_bytes(root / "step_000004" / "trainer_state.safetensors")
    assert ckpt_lib.find_resume_checkpoint(root, move_aside=False) == root / "step_000002"
    assert (root / "step_000004").is_dir()  # another rank leaves it for rank 0
    assert ckpt_lib.find_resume_checkpoint(root) == root / "step_000002"
    assert not (root / "step_000004").exists() and (root / "step_000004.corrupt").is_dir()

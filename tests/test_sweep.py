"""Sweeps: a 2 x 2 MoM grid trains, tabulates and plots; a rerun reuses finished points;
an interrupted point resumes; changed settings and bad grids fail before training; the
phase-2 sweep converts a vanilla model per point."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from modformer.cli_args_train import add_sweep_arguments
from modformer.commands.sweep import run_sweep
from modformer.experiments.sweep import (
    GridAxis,
    SweepError,
    parse_grid,
    plot_sweep,
    sweep,
)
from modformer.models.gpt import GPTConfig, GPTForCausalLM

FAST = {
    "data": {"block_size": 16},
    "batch_size": 2,
    "eval_batches": 1,
    "eval_interval": 0,
    "log_interval": 1,
    "ckpt_interval": 0,
    "progress": False,
    "threads": 1,
    "optim": {"warmup_steps": 1, "lr": 3e-3, "min_lr": 3e-4},
}


def mom_base_config(tmp_path: Path, data_dir: Path) -> Path:
    settings = {
        **FAST,
        "data": {**FAST["data"], "dir": str(data_dir)},
        "model": {
            "arch": "mom",
            "preset": "tiny",
            "overrides": {
                "n_embd": 32,
                "n_head": 2,
                "router_dim": 16,
                "n_positions": 32,
                "chunks": "[1-2-1]",
            },
        },
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    return parser


def test_two_by_two_grid_trains_tabulates_plots_and_resumes(tiny_data_dir, tmp_path, capsys):
    base = mom_base_config(tmp_path, tiny_data_dir)
    out = tmp_path / "sweep"
    argv = ["--base-config", str(base), "--grid", "model.overrides.K=1,2",
            "--grid", "model.overrides.H=1,2", "--out-dir", str(out), "--steps", "3"]  # fmt: skip
    result = run_sweep(sweep_parser().parse_args(argv))

    names = ["K1_H1", "K1_H2", "K2_H1", "K2_H2"]
    assert [row["name"] for row in result["points"]] == names
    assert all(row["status"] == "trained" and row["steps"] == 3 for row in result["points"])
    assert all(math.isfinite(row["val_loss"]) for row in result["points"])
    for name in names:
        model_config = json.loads((out / "points" / name / "model" / "config.json").read_text())
        assert (model_config["K"], model_config["H"]) == (int(name[1]), int(name[-1]))
    # K and H change the graph, not the parameter count (paper Figure 4's premise) ...
    assert len({row["params"] for row in result["points"]}) == 1
    # ... and the table and plot are on disk.
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == names
    assert set(table[0]) >= {
        "model.overrides.K",
        "model.overrides.H",
        "val_loss",
        "params",
        "steps",
    }
    assert float(table[3]["val_loss"]) == pytest.approx(result["points"][3]["val_loss"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["grid"] == {"model.overrides.K": [1, 2], "model.overrides.H": [1, 2]}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "K2_H2" in capsys.readouterr().out

    # A second run reuses every finished point.
    mtimes = {name: (out / "points" / name / "final.json").stat().st_mtime_ns for name in names}
    again = run_sweep(sweep_parser().parse_args(argv))
    assert [row["status"] for row in again["points"]] == ["done before"] * 4
    assert [row["val_loss"] for row in again["points"]] == [
        row["val_loss"] for row in result["points"]
    ]
    for name in names:
        assert (out / "points" / name / "final.json").stat().st_mtime_ns == mtimes[name]

    # A point without final.json continues from its checkpoint (here the last one).
    (out / "points" / "K2_H1" / "final.json").unlink()
    resumed = run_sweep(sweep_parser().parse_args(argv))
    statuses = {row["name"]: row["status"] for row in resumed["points"]}
    assert statuses == {"K1_H1": "done before", "K1_H2": "done before",
                        "K2_H1": "resumed", "K2_H2": "done before"}  # fmt: skip
    assert resumed["points"][2]["val_loss"] == pytest.approx(result["points"][2]["val_loss"])

    # Other settings in the same directory: a clear error, nothing retrained.
    with pytest.raises(SweepError, match=r"different settings \(optim\)"):
        run_sweep(sweep_parser().parse_args(argv + ["--set", "optim.lr=1e-3"]))


def test_interrupted_point_resumes_from_its_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    from modformer.train import checkpoint as ckpt_lib
    from modformer.train import trainer

    base = mom_base_config(tmp_path, tiny_data_dir)
    grid, sets = ["model.overrides.H=2"], ["ckpt_interval=1"]
    reference = sweep(base, grid, tmp_path / "reference", sets=sets, steps=3)

    real_lr_at = trainer.lr_at

    def interrupt(step, cfg):
        # The scheduler asks for step 2's rate at the end of the second optimizer step,
        # before that step's checkpoint: as if the job were killed there.
        if step == 2:
            raise KeyboardInterrupt
        return real_lr_at(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sweep(base, grid, tmp_path / "sweep", sets=sets, steps=3)
    point = tmp_path / "sweep" / "points" / "H2"
    assert not (point / "final.json").exists()
    assert ckpt_lib.latest_checkpoint(point / "checkpoints").name == "step_000001"
    monkeypatch.setattr(trainer, "lr_at", real_lr_at)

    resumed = sweep(base, grid, tmp_path / "sweep", sets=sets, steps=3)
    assert resumed["points"][0]["status"] == "resumed"
    # exact resume on CPU fp32: the same loss as the uninterrupted run
    assert resumed["points"][0]["val_loss"] == pytest.approx(
        reference["points"][0]["val_loss"], abs=1e-6
    )


@pytest.mark.parametrize(
    "grid, message",
    [
        (["model.overrides.K="], "non-empty comma-separated list"),
        (["model.overrides.K=1,,2"], "non-empty comma-separated list"),
        (["model.overrides.K"], "must look like SECTION.FIELD=V1,V2"),
        (["model.overrides.K=1,1"], "lists a value twice"),
        (["out_dir=a,b"], "the sweep sets out_dir itself"),
        (["optim.lrate=1,2"], r"unknown setting optim\.lrate; did you mean optim\.lr"),
        (["model.overrides.bogus=1,2"], "bogus"),
        (["model.overrides.K=1,4"], "K=4 exceeds the 3 choices"),
        (["max_steps=1,2"], "--steps and --grid max_steps"),
        (["model.overrides.K=1", "model.overrides.K=2"], "appears in two --grid options"),
    ],
)
def test_bad_grids_fail_before_training(tiny_data_dir, tmp_path, grid, message):
    base = mom_base_config(tmp_path, tiny_data_dir)
    out = tmp_path / "sweep"
    with pytest.raises(SweepError, match=message):
        sweep(base, grid, out, steps=2)
    assert not (out / "points").exists()  # nothing trained, not even the valid points


def test_grid_values_are_yaml_scalars():
    assert parse_grid("optim.lr=1e-3, 3e-4").values == [1e-3, 3e-4]
    assert parse_grid("model.overrides.skip=true,false").values == [True, False]
    assert parse_grid("model.overrides.router=gru,mlp").values == ["gru", "mlp"]


def test_plot_handles_text_values_and_declines_three_axes(tmp_path):
    axes = [
        GridAxis("model.overrides.router", ["gru", "mlp"]),
        GridAxis("model.overrides.H", [1, 2]),
    ]
    rows = [
        {"model.overrides.router": r, "model.overrides.H": h, "val_loss": 3.0 - 0.1 * h}
        for r in ("gru", "mlp")
        for h in (1, 2)
    ]
    rows[-1]["val_loss"] = None  # a point without a result is a gap, not a crash
    assert plot_sweep(axes, rows, tmp_path / "two.png").is_file()
    three = axes + [GridAxis("seed", [1, 2])]
    assert plot_sweep(three, rows, tmp_path / "three.png") is None


def test_phase_two_sweep_converts_the_vanilla_model_per_point(tiny_data_dir, tmp_path):
    torch.manual_seed(0)
    vanilla = GPTForCausalLM(
        GPTConfig.from_preset(
            "tiny", vocab_size=257, n_layer=4, n_embd=32, n_head=2, n_positions=32
        )
    )
    vanilla.save_pretrained(tmp_path / "vanilla")
    settings = {**FAST, "data": {**FAST["data"], "dir": str(tiny_data_dir)}}
    settings["model"] = {"overrides": {"chunks": "[1-2-1]", "K": 2, "skip": True, "router_dim": 16}}
    base = tmp_path / "phase2.yaml"
    base.write_text(yaml.safe_dump(settings))
    out = tmp_path / "sweep"
    result = sweep(
        base, ["model.overrides.H=1,2"], out, steps=2, init_from_vanilla=tmp_path / "vanilla"
    )
    assert [row["name"] for row in result["points"]] == ["H1", "H2"]
    for h in (1, 2):
        init = json.loads((out / "points" / f"H{h}" / "init" / "config.json").read_text())
        assert (init["K"], init["H"], init["skip"], init["chunks"]) == (2, h, True, "[1-2-1]")
        assert init["router_dim"] == 16
        trained = json.loads((out / "points" / f"H{h}" / "model" / "config.json").read_text())
        assert trained["H"] == h and trained["model_type"] == "modformer_mom"
    assert (out / "sweep.png").is_file()

    with pytest.raises(SweepError, match="K=4 exceeds"):
        sweep(base, ["model.overrides.K=2,4"], tmp_path / "bad", steps=1,
              init_from_vanilla=tmp_path / "vanilla")  # fmt: skip
    with pytest.raises(SweepError, match="covers 3 layers"):
        sweep(base, ["model.overrides.chunks=[1-2-1],[1-2]"], tmp_path / "bad2", steps=1,
              init_from_vanilla=tmp_path / "vanilla")  # fmt: skip


def test_bad_vanilla_model_is_a_clear_error(tiny_data_dir, tmp_path):
    base = mom_base_config(tmp_path, tiny_data_dir)
    with pytest.raises(SweepError, match="--init-from-vanilla: .* does not exist"):
        sweep(base, ["model.overrides.H=1"], tmp_path / "s", init_from_vanilla=tmp_path / "nope")
    from modformer.models.mom import MoMConfig, MoMForCausalLM

    MoMForCausalLM(
        MoMConfig.from_preset("tiny", n_embd=32, n_head=2, router_dim=16)
    ).save_pretrained(tmp_path / "mom")
    with pytest.raises(SweepError, match="starts from a vanilla model"):
        sweep(base, ["model.overrides.H=1"], tmp_path / "s", init_from_vanilla=tmp_path / "mom")

"""The catastrophic-forgetting experiment: a smoke run of the whole pipeline, and bad input."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from conftest import make_text_inputs
from modformer.cli_args import add_forgetting_arguments
from modformer.commands.forgetting import run_forgetting
from modformer.data.prepare import prepare
from modformer.experiments.forgetting import (
    format_forgetting_table,
    old_loss_at_new_loss,
    run_forgetting_experiment,
)
from modformer.surgery import SurgeryError


@pytest.fixture(scope="module")
def three_domain_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting_data")
    inputs = [
        f"{name}={make_text_inputs(root / name, n_docs=12, seed=seed)}"
        for seed, name in enumerate(("prose", "c", "python"))
    ]
    prepare(root / "prepared", inputs=inputs, tokenizer="byte", progress=False)
    return root / "prepared"


def test_smoke_run_has_the_table_structure(tmp_path, three_domain_data, capsys):
    parser = argparse.ArgumentParser()
    add_forgetting_arguments(parser)
    args = parser.parse_args(
        [
            "--out-dir", str(tmp_path / "exp"),
            "--data", str(three_domain_data),
            "--pretrain-steps", "2",
            "--steps", "2",
            "--reg-weights", "0,1",
            "--batch-size", "2",
            "--block-size", "16",
            "--eval-batches", "1",
            "--trajectory-interval", "1",
            "--threads", "1",
        ]
    )  # fmt: skip
    torch.set_num_threads(2)
    try:
        result = run_forgetting(args)
        assert torch.get_num_threads() == 2  # its one thread is not left behind
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)
    assert result["settings"]["threads"] == 1

    methods = [row["method"] for row in result["rows"]]
    assert methods == [
        "moduleformer full",
        "moduleformer insert reg=0",
        "moduleformer insert reg=1",
        "gpt full",
    ]
    rows = {row["method"]: row for row in result["rows"]}
    for row in result["rows"]:
        for when in ("before", "after"):
            assert set(row[when]["per_domain"]) == {"prose", "c", "python"}
            ev = row[when]
            assert all(math.isfinite(ev[k]) for k in ("old", "new"))
            # "old" and "all" are token-weighted means of the domains' losses.
            tokens, losses = ev["tokens"], ev["per_domain"]
            old = (losses["prose"] * tokens["prose"] + losses["c"] * tokens["c"]) / (
                tokens["prose"] + tokens["c"]
            )
            assert ev["old"] == pytest.approx(old) and ev["new"] == losses["python"]
            assert min(losses.values()) < ev["all"] < max(losses.values())
    # Every ModuleFormer run starts from the same pretrained model.
    befores = {json.dumps(row["before"]) for m, row in rows.items() if m.startswith("module")}
    assert len(befores) == 1
    for name in ("moduleformer insert reg=0", "moduleformer insert reg=1"):
        assert rows[name]["frozen_unchanged"] is True
        assert set(rows[name]["at_insertion"]) == {"old", "new", "all", "per_domain", "tokens"}
        assert rows[name]["trainable_params"] < rows["moduleformer full"]["trainable_params"]
        assert rows[name]["params"] > rows["moduleformer full"]["params"]
    assert rows["gpt full"]["trainable_params"] == rows["gpt full"]["params"]

    assert json.loads((tmp_path / "exp" / "forgetting.json").read_text()) == result
    table = format_forgetting_table(result)
    assert table in capsys.readouterr().out
    lines = table.splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| method | trainable params")
    assert all(line.count("|") == 10 for line in lines)

    # Full fine-tuning was evaluated at steps 0 (the pretrained model), 1 and 2 (the end);
    # its intermediate checkpoints are gone once evaluated.
    for name in ("moduleformer full", "gpt full"):
        points = rows[name]["trajectory"]
        assert [p["step"] for p in points] == [0, 1, 2]
        assert points[0]["old"] == rows[name]["before"]["old"]
        assert points[-1]["new"] == rows[name]["after"]["new"]
    assert not (tmp_path / "exp" / "runs" / "moduleformer_full" / "checkpoints").exists()
    for name in ("moduleformer insert reg=0", "moduleformer insert reg=1"):
        expected = old_loss_at_new_loss(
            rows["moduleformer full"]["trajectory"], rows[name]["after"]["new"]
        )
        assert rows[name]["full_at_equal_new"] == expected


def test_bad_input(tmp_path, three_domain_data):
    with pytest.raises(SurgeryError, match=r"has no domain\(s\) \['german'\]"):
        run_forgetting_experiment(tmp_path, three_domain_data, new_domain="german")
    with pytest.raises(SurgeryError, match="must not be among the old ones"):
        run_forgetting_experiment(
            tmp_path, three_domain_data, old_domains=["prose", "python"], new_domain="python"
        )
    with pytest.raises(SurgeryError, match="steps must be >= 1"):
        run_forgetting_experiment(tmp_path, three_domain_data, steps=0)
    with pytest.raises(SurgeryError, match="routing_reg_weights"):
        run_forgetting_experiment(tmp_path, three_domain_data, routing_reg_weights=[-1.0])
    with pytest.raises(SurgeryError, match="trajectory_interval must be >= 0"):
        run_forgetting_experiment(tmp_path, three_domain_data, trajectory_interval=-1)


def test_old_loss_at_new_loss_interpolates_at_the_first_crossing():
    points = [
        {"step": 0, "old": 4.0, "new": 5.0},
        {"step": 10, "old": 4.4, "new": 4.6},
        {"step": 20, "old": 4.6, "new": 4.7},  # not monotone: the first crossing counts
        {"step": 30, "old": 4.8, "new": 4.2},
    ]
    at = old_loss_at_new_loss(points, 4.8)  # halfway from step 0 to step 10
    assert at == pytest.approx({"old": 4.2, "step": 5.0})
    assert old_loss_at_new_loss(points, 4.6) == pytest.approx({"old": 4.4, "step": 10.0})
    at = old_loss_at_new_loss(points, 4.4)  # between steps 20 and 30: 3/5 of the way
    assert at == pytest.approx({"old": 4.6 + 0.6 * 0.2, "step": 26.0})
    assert old_loss_at_new_loss(points, 4.1) is None  # never learned that much
    assert old_loss_at_new_loss(points, 5.0) is None  # nothing learned: nothing to match
    assert old_loss_at_new_loss(points, 5.3) is None

"""The catastrophic-forgetting experiment: a smoke run of the whole pipeline, and bad input."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from conftest import make_text_inputs
from modformer.cli_args import add_forgetting_arguments
from modformer.data.prepare import prepare
from modformer.surgery import SurgeryError
from modformer.surgery.forgetting import (
    format_forgetting_table,
    run_forgetting,
    run_forgetting_experiment,
)


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
            assert all(math.isfinite(row[when][k]) for k in ("old", "new"))
    # Every ModuleFormer run starts from the same pretrained model.
    befores = {json.dumps(row["before"]) for m, row in rows.items() if m.startswith("module")}
    assert len(befores) == 1
    for name in ("moduleformer insert reg=0", "moduleformer insert reg=1"):
        assert rows[name]["frozen_unchanged"] is True
        assert set(rows[name]["at_insertion"]) == {"old", "new", "per_domain"}
        assert rows[name]["trainable_params"] < rows["moduleformer full"]["trainable_params"]
        assert rows[name]["params"] > rows["moduleformer full"]["params"]
    assert rows["gpt full"]["trainable_params"] == rows["gpt full"]["params"]

    assert json.loads((tmp_path / "exp" / "forgetting.json").read_text()) == result
    table = format_forgetting_table(result)
    assert table in capsys.readouterr().out
    lines = table.splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| method | trainable params")
    assert all(line.count("|") == 9 for line in lines)


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

"""`modformer demo`: a run of some stages merges its results into results.json."""

from __future__ import annotations

import json

import pytest

from modformer.cli import build_parser
from modformer.commands.demo import run_demo
from modformer.config import ConfigError
from modformer.experiments import demo


@pytest.fixture
def cheap_stages(monkeypatch):
    """The stages' bookkeeping without their training: data prep and the report stubbed."""
    meta = {"domains": ["python"], "splits": {"train": {"tokens": 10}, "val": {"tokens": 2}}}
    monkeypatch.setattr(
        demo, "_prepare_data", lambda settings, data_dir: {**meta, "vocab_size": 257}
    )
    monkeypatch.setattr(
        demo, "stage_report", lambda settings, data_dir, work: {"figures": ["report/a.png"]}
    )


def test_report_stage_merges_into_results_json(tmp_path, cheap_stages, capsys):
    earlier = {
        "vanilla": {"val_loss": 3.2, "params": 123},
        "mom": [{"name": "MoM", "val_loss": 3.1}],
        "report": {"figures": ["old.png"]},
    }
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    args = build_parser().parse_args(
        ["demo", "--work-dir", str(tmp_path), "--stages", "report", "--no-progress"]
    )
    run_demo(args)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == {**earlier, "report": {"figures": ["report/a.png"]}}
    assert "report/a.png" in capsys.readouterr().out


def test_unreadable_results_json_is_a_clear_error_before_any_stage(tmp_path, cheap_stages):
    (tmp_path / "results.json").write_text("[1, 2")
    args = build_parser().parse_args(["demo", "--work-dir", str(tmp_path), "--stages", "report"])
    with pytest.raises(ConfigError, match="not a demo results file.*delete it"):
        run_demo(args)
    assert (tmp_path / "results.json").read_text() == "[1, 2"


def test_the_command_passes_its_options_and_defaults_as_demo_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: seen.append(settings) or {})
    run_demo(build_parser().parse_args(["demo"]))
    assert seen[0] == demo.DemoSettings(stages=list(demo.STAGES))  # the help shows these
    argv = ["demo", "--stages", "mom, report", "--steps", "7", "--seed", "3", "--no-progress"]
    run_demo(build_parser().parse_args(argv))
    expected = demo.DemoSettings(stages=["mom", "report"], steps=7, seed=3, progress=False)
    assert seen[1] == expected


def test_stages_given_as_one_string_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="list of stage names"):
        demo.run_demo(demo.DemoSettings(work_dir=str(tmp_path), stages="report"))

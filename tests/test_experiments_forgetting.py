"""`modformer reproduce moduleformer-forgetting` at quick scale, and its matched-plasticity
comparison."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_text_inputs
from modformer.data.prepare import prepare
from modformer.experiments.common import ArmResult, run_experiment
from modformer.experiments.moduleformer_forgetting import EARLY, matched_difference
from modformer.experiments.moduleformer_vs_dense import DATA_ENV


@pytest.fixture(scope="module")
def three_domain_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting_reproduce")
    inputs = [
        f"{name}={make_text_inputs(root / name, n_docs=8, seed=seed)}"
        for seed, name in enumerate(("prose", "c", "python"))
    ]
    prepare(root / "prepared", inputs=inputs, tokenizer="byte", progress=False)
    return root / "prepared"


def _arm(name: str, before: tuple, after: tuple, points: list[tuple] | None = None):
    """An ArmResult with (old, new) losses before and after, and (step, old, new) points."""
    extra = {
        "before": {"old": before[0], "new": before[1]},
        "after": {"old": after[0], "new": after[1]},
    }
    if points is not None:
        extra["trajectory"] = [{"step": s, "old": o, "new": n} for s, o, n in points]
    return ArmResult(name, 0, 0.0, 1, 1, 1, 1, 1, 0.0, extra)


def test_matched_difference_compares_forgetting_at_equal_learning():
    full = _arm("full", (4.0, 5.0), (4.8, 4.0), [(0, 4.0, 5.0), (10, 4.4, 4.5), (20, 4.8, 4.0)])
    # Learned 0.25 (half way to step 10): full FT forgot 0.2 there, the arm 0.1.
    insert = _arm("insert", (4.0, 5.0), (4.1, 4.75))
    m = matched_difference(insert, full)
    assert m["arm"] == pytest.approx(0.1) and m["reference"] == pytest.approx(0.2)
    assert m["learning"] == pytest.approx(-0.25) and m["at"] == "full step 5.0"
    # Learning more than the reference ever did, without a trajectory: no match.
    assert matched_difference(_arm("x", (4.0, 5.0), (4.1, 3.9)), full) is None
    # A model pretrained apart, learning more: its own trajectory is read at the
    # reference's final learning (-1.0), in changes from its own pretrained model.
    gpt = _arm("gpt", (5.0, 6.0), (5.9, 4.5), [(0, 5.0, 6.0), (10, 5.4, 5.0), (20, 5.9, 4.5)])
    m = matched_difference(gpt, full)
    assert m["arm"] == pytest.approx(0.4) and m["reference"] == pytest.approx(0.8)
    assert m["learning"] == pytest.approx(-1.0) and m["at"] == "gpt step 10.0"


def test_forgetting_quick(three_domain_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(three_domain_dir))
    torch.set_num_threads(1)
    out = tmp_path / "forgetting"
    payload = run_experiment("moduleformer-forgetting", out, [0], "quick")
    rows = {(r["arm"], r["seed"]): r for r in payload["results"]}
    arms = {"pretrain_moduleformer", "moduleformer_full", "insert_reg0", "insert_reg1"}
    assert set(rows) == {(a, 0) for a in arms | {"pretrain_gpt", "gpt_full", EARLY}}
    for seed in (0,):  # one seed: the seeds' plumbing is common.py's (test_experiments)
        pre = rows["pretrain_moduleformer", seed]["extra"]["eval"]
        full = rows["moduleformer_full", seed]
        # Every ModuleFormer arm starts from that seed's pretrained model; the whole
        # validation split of each domain is evaluated.
        for arm in ("moduleformer_full", "insert_reg0", "insert_reg1"):
            assert rows[arm, seed]["extra"]["before"] == pre
        tokens = pre["tokens"]
        assert tokens == rows["pretrain_gpt", seed]["extra"]["eval"]["tokens"]
        assert all(t > 8 * 16 for t in tokens.values())  # more than eval_batches would give
        steps = [p["step"] for p in full["extra"]["trajectory"]]
        assert steps == [0, 2, 4] and "trajectory" in rows["gpt_full", seed]["extra"]
        # The early arm is the baseline's run again, evaluated at every step up to step 2.
        early = rows[EARLY, seed]["extra"]["trajectory"]
        assert [p["step"] for p in early] == [0, 1, 2, 4]
        assert [early[i] for i in (0, 2, 3)] == full["extra"]["trajectory"]
        for arm in ("insert_reg0", "insert_reg1"):
            r = rows[arm, seed]
            assert r["extra"]["frozen_unchanged"] is True
            assert r["extra"]["trainable_params"] < full["extra"]["trainable_params"]
            assert r["total_params"] > full["total_params"]
            assert r["train_tokens"] == full["train_tokens"]
    assert f"insert_reg1 vs {EARLY}" in payload["matched_plasticity"]
    for arm in ("insert_reg0", "insert_reg1", "gpt_full"):
        assert payload["changes"][arm]["forgetting"]["baseline"] == "moduleformer_full"
        assert {d["seed"] for d in payload["matched_plasticity"][f"{arm} vs moduleformer_full"][
            "details"
        ]} == {0}  # fmt: skip
    md = (out / "results.md").read_text()
    assert "Matched plasticity" in md and "| insert_reg1 | moduleformer_full |" in md
    # Resumable: a second call retrains nothing.
    stored = json.loads((out / "arms" / "insert_reg0" / "seed_0.json").read_text())
    monkeypatch.setattr(
        "modformer.experiments.moduleformer_forgetting.continual",
        lambda *a, **k: pytest.fail("a stored arm was trained again"),
    )
    again = run_experiment("moduleformer-forgetting", out, [0], "quick")
    again_rows = {(r["arm"], r["seed"]): r for r in again["results"]}
    assert again_rows["insert_reg0", 0]["val_loss"] == stored["val_loss"]

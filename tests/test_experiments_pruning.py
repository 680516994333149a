"""The pruning-curves experiment (moduleformer-pruning): curve matching at equal
parameters, and the whole experiment at quick scale on a tiny two-domain dataset."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_text_inputs
from modformer.data.prepare import prepare
from modformer.experiments.common import run_experiment
from modformer.experiments.moduleformer_pruning import FP_ARMS
from modformer.experiments.moduleformer_vs_dense import DATA_ENV
from modformer.experiments.pruning_curves import Point, interpolate, matched_comparison


def point(label: str, ratio: float, loss: float) -> Point:
    return Point(label, ratio, loss, 0, 0.0, 0.0)


def test_interpolate_is_linear_between_points_and_refuses_to_extrapolate():
    curve = [(1.0, 3.0), (0.5, 4.0), (0.25, 6.0)]
    assert interpolate(curve, 0.75) == pytest.approx(3.5)
    assert interpolate(curve, 0.375) == pytest.approx(5.0)
    assert interpolate(curve, 0.5) == pytest.approx(4.0)
    assert interpolate(curve, 1.0) == pytest.approx(3.0)
    assert interpolate(curve, 0.2) is None and interpolate(curve, 1.01) is None
    assert interpolate([(1.0, 3.0), (1.0, 5.0)], 1.0) == pytest.approx(4.0)  # ties: mean


def test_matched_comparison_pairs_seeds_at_the_points_ratio():
    # Method "a" lands at ratio 0.75 and 0.6 on two seeds; "b" is linear in the ratio.
    curves = {
        ("a", 0): [point("tau0.5", 0.75, 3.0)],
        ("a", 1): [point("tau0.5", 0.6, 3.5)],
        ("a", 2): [point("tau0.5", 0.1, 9.0)],  # outside b's range: not compared
        ("b", 0): [point("unpruned", 1.0, 2.0), point("layers1", 0.5, 4.0)],
        ("b", 1): [point("unpruned", 1.0, 2.5), point("layers1", 0.5, 4.5)],
        ("b", 2): [point("unpruned", 1.0, 2.0), point("layers1", 0.5, 4.0)],
    }
    m = matched_comparison(curves, "a", "tau0.5", "b")
    c = m.comparison
    assert c.seeds == [0, 1]
    # b at 0.75 (seed 0): 3.0; at 0.6 (seed 1): 4.1. Differences 0.0 and -0.6.
    assert c.diff_mean == pytest.approx(-0.3)
    assert c.diff_se == pytest.approx(0.3)
    assert c.verdict == "within noise"
    assert m.ratio_mean == pytest.approx((0.75 + 0.6 + 0.1) / 3)
    assert matched_comparison(curves, "a", "tau0.9", "b").comparison is None


@pytest.fixture
def python_data(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("pruning_data")
    inputs = [
        f"{name}={make_text_inputs(root / name, n_docs=20, seed=i)}"
        for i, name in enumerate(("python", "prose"))
    ]
    prepare(root / "prepared", inputs=inputs, tokenizer="byte", progress=False)
    monkeypatch.setenv(DATA_ENV, str(root / "prepared"))
    torch.set_num_threads(1)
    return root / "prepared"


def test_moduleformer_pruning_quick(python_data, tmp_path):
    out = tmp_path / "pruning"
    payload = run_experiment("moduleformer-pruning", out, [0], "quick")
    rows = {r["arm"]: r for r in payload["results"]}
    assert set(rows) == {"pretrain", "fp_lc", "fp_lc_x100", "fp_lc_x1000", "fp_noaux", "pf",
                         "drop_top", "drop_uniform", "drop_top_ft"}  # fmt: skip
    total = rows["pretrain"]["total_params"]
    weights = {arm: rows[arm]["extra"]["load_concentration_weight"] for arm in FP_ARMS}
    assert weights == {"fp_lc": 0.001, "fp_lc_x100": 0.1, "fp_lc_x1000": 1.0, "fp_noaux": 0.0}
    for arm in ("fp_lc", "fp_noaux", "pf"):
        points = {p["label"]: p for p in rows[arm]["extra"]["points"]}
        assert set(points) == {"unpruned", "tau0.3", "tau0.9"}
        assert points["unpruned"]["params_ratio"] == 1.0
        # A higher threshold never keeps more; the ratio is the one of the parameters.
        assert points["tau0.9"]["params_ratio"] <= points["tau0.3"]["params_ratio"] < 1.0
        for p in points.values():
            assert p["params_ratio"] == pytest.approx(p["total_params"] / total)
    # pf and the layer drops start from fp_noaux's unpruned fine-tuned model.
    reference = rows["fp_noaux"]["extra"]["points"][0]
    for arm in ("pf", "drop_top", "drop_uniform", "drop_top_ft"):
        assert rows[arm]["extra"]["points"][0] == reference
    # The quick model has 2 layers: one layer-drop point each, at the same ratio.
    drops = [rows[a]["extra"]["points"][1] for a in ("drop_top", "drop_uniform", "drop_top_ft")]
    assert [p["label"] for p in drops] == ["layers1"] * 3
    assert len({p["params_ratio"] for p in drops}) == 1
    assert drops[2]["val_loss"] != drops[0]["val_loss"]  # drop_top_ft was fine-tuned
    questions = payload["matched"]
    assert "fp_lc vs fp_noaux: load concentration (weight 0.001) vs none (Fig. 4)" in questions
    assert all(len(rows_) == 2 for rows_ in questions.values())  # one row per threshold
    md = (out / "results.md").read_text()
    assert "## At equal parameters" in md and "low-usage experts" in md
    assert (out / "pruning_curves.png").is_file()
    # Resumable: a second call reuses every stored stage.
    mtime = (out / "arms" / "pf" / "seed_0.json").stat().st_mtime_ns
    again = run_experiment("moduleformer-pruning", out, [0], "quick")
    assert (out / "arms" / "pf" / "seed_0.json").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["results"] == again["results"]


def test_pruning_needs_a_python_domain(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tiny_data_dir))
    with pytest.raises(ValueError, match="'python' domain"):
        run_experiment("moduleformer-pruning", tmp_path / "out", [0], "quick")

"""The ModuleFormer reproduction experiments at quick scale on a tiny prepared dataset."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_text_inputs
from modformer.data.prepare import prepare
from modformer.experiments.common import run_experiment
from modformer.experiments.moduleformer_balance import usage_summary
from modformer.experiments.moduleformer_specialisation import divergences
from modformer.experiments.moduleformer_vs_dense import DATA_ENV


@pytest.fixture
def tiny_data(tiny_data_dir, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tiny_data_dir))
    torch.set_num_threads(1)
    return tiny_data_dir


@pytest.fixture(scope="module")
def two_domain_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_domains")
    inputs = [
        f"{name}={make_text_inputs(root / name, n_docs=20, seed=i)}"
        for i, name in enumerate(("a", "b"))
    ]
    prepare(root / "prepared", inputs=inputs, tokenizer="byte", progress=False)
    return root / "prepared"


@pytest.fixture
def two_domains(two_domain_dir, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(two_domain_dir))
    torch.set_num_threads(1)
    return two_domain_dir


def test_usage_summary_counts_entropy_dead_and_rare_experts():
    counts = {
        "layer0/attn": torch.tensor([5, 5, 5, 5]),  # uniform: entropy 1, none dead
        "layer0/ffn": torch.tensor([100, 0, 1, 99]),  # one dead, one rare (1/200 < 0.1/4)
    }
    s = usage_summary(counts)
    p = torch.tensor([100, 1, 99], dtype=torch.float64) / 200
    h = float(-(p * p.log()).sum() / torch.log(torch.tensor(4.0, dtype=torch.float64)))
    assert s["usage_entropy"] == pytest.approx((1.0 + h) / 2)
    assert s["usage_entropy_min"] == pytest.approx(h)
    assert (s["dead_experts"], s["rare_experts"], s["experts"]) == (1, 2, 8)


def test_moduleformer_vs_dense_quick(tiny_data, tmp_path):
    out = tmp_path / "vs_dense"
    payload = run_experiment("moduleformer-vs-dense", out, [0, 1], "quick")
    by_arm = {(r["arm"], r["seed"]): r for r in payload["results"]}
    mf, gpt = by_arm["moduleformer", 0], by_arm["gpt_equal_active", 0]
    dense, big = by_arm["dense_moduleformer", 0], by_arm["gpt_equal_total", 0]
    # The matched costs the table names: equal active FLOPs (routers aside: within 10%),
    # equal total parameters (within 1%), the dense ModuleFormer runs every parameter.
    assert mf["flops_per_token"] == pytest.approx(gpt["flops_per_token"], rel=0.1)
    assert big["total_params"] == pytest.approx(mf["total_params"], rel=0.01)
    assert mf["active_params"] < 0.6 * mf["total_params"]
    assert dense["flops_per_token"] > 2 * mf["flops_per_token"]
    assert all(r["train_tokens"] == mf["train_tokens"] for r in payload["results"])
    assert set(payload["speed"]) == {
        "moduleformer",
        "gpt_equal_active",
        "dense_moduleformer",
        "gpt_equal_total",
    }
    assert payload["speed"]["gpt_equal_active"]["latency_ratio"] == pytest.approx(1.0)
    md = (out / "results.md").read_text()
    assert "vs gpt_equal_active" in md and "latency / baseline" in md
    # Resumable: a second call trains nothing (the stored arms are reused).
    stored = json.loads((out / "arms" / "moduleformer" / "seed_0.json").read_text())
    again = run_experiment("moduleformer-vs-dense", out, [0, 1], "quick")
    assert {(r["arm"], r["seed"]): r["val_loss"] for r in again["results"]}[
        "moduleformer", 0
    ] == stored["val_loss"]


def test_moduleformer_balance_quick(two_domains, tmp_path):
    out = tmp_path / "balance"
    payload = run_experiment("moduleformer-balance", out, [0], "quick")  # pairing: vs-dense
    rows = {(r["arm"], r["seed"]): r for r in payload["results"]}
    assert {a for a, _ in rows} == {"mi", "switch", "none", "softmax_rope", "mi_x10"}
    for (arm, _), r in rows.items():
        extra = r["extra"]
        assert 0.0 <= extra["usage_entropy"] <= 1.0 and extra["experts"] == 4 * (4 + 8)
        assert ("val_loss_2x_length" in extra) == (arm in ("mi", "softmax_rope"))
        assert r["total_params"] == rows["mi", 0]["total_params"]
    assert payload["comparisons"]["switch"]["baseline"] == "mi"
    assert "dead experts" in (out / "results.md").read_text()


def test_bad_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="not a prepared data directory"):
        run_experiment("moduleformer-balance", tmp_path / "out", [0], "quick")


def test_divergences_between_domains_and_split_half_floor():
    c = lambda *v: torch.tensor(v)  # noqa: E731
    halves = {
        "a": [
            {"layer0/ffn": c(9, 1), "layer0/attn": c(1, 1)},
            {"layer0/ffn": c(8, 2), "layer0/attn": c(1, 1)},
        ],
        "b": [
            {"layer0/ffn": c(1, 9), "layer0/attn": c(1, 1)},
            {"layer0/ffn": c(2, 8), "layer0/attn": c(1, 1)},
        ],
    }
    d = divergences(halves)
    assert d["between"] > 10 * d["noise_floor"] > 0
    same = {"a": halves["a"], "b": halves["a"]}
    assert divergences(same)["between"] == pytest.approx(divergences(same)["noise_floor"])
    with pytest.raises(ValueError, match="at least two domains"):
        divergences({"a": halves["a"]})


def test_moduleformer_specialisation_quick(two_domains, tmp_path):
    out = tmp_path / "moduleformer-specialisation"
    payload = run_experiment("moduleformer-specialisation", out, [0, 1], "quick")
    rows = {(r["arm"], r["seed"]) for r in payload["rows"]}
    assert rows == {(a, s) for a in ("mi", "switch", "untrained") for s in (0, 1)}
    assert all(r["between"] >= 0 and r["noise_floor"] >= 0 for r in payload["rows"])
    # The trained models are the balance experiment's (trained here into its directory).
    assert (tmp_path / "moduleformer-balance-quick" / "arms" / "mi" / "seed_1.json").is_file()
    assert "noise floor" in (out / "results.md").read_text()

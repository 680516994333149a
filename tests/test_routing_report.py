"""Routing reports: figures exist, the JSON holds the right numbers (transition totals,
symmetric KL tables with zero diagonals), the KL maths, the CLI and the errors."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from modformer.analysis.routing_report import (
    build_report,
    kl_table,
    smoothed_distribution,
    transition_probabilities,
    write_routing_report,
)
from modformer.analysis.usage import UsageError, UsageStats, collect_usage, collect_usage_on_data
from modformer.cli_args import add_routing_report_arguments
from modformer.commands.routing_report import run_routing_report
from test_usage import random_batches, tiny_moduleformer, tiny_mom, two_domain_data  # noqa: F401


def assert_png(path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_mom_report_figures_and_numbers(two_domain_data, tmp_path):  # noqa: F811
    stats = collect_usage_on_data(tiny_mom("K2H3S"), two_domain_data, block_size=16, batch_size=4)
    report = write_routing_report(stats, tmp_path)
    expected = {
        "usage_heatmap.png",
        "transitions.png",
        "domain_experts_attn.png",
        "domain_kl_attn.png",
        "domain_experts_ffn.png",
        "domain_kl_ffn.png",
    }
    assert set(report["figures"]) == expected
    for name in expected:
        assert_png(tmp_path / name)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["figures"] == report["figures"]
    assert saved["domains"] == ["code", "prose"]

    for key in ("chunk0/attn", "chunk0/ffn"):
        entry = saved["transitions"][key]
        assert entry["labels"] == ["M0", "M1", "SKIP"]
        counts = np.array(entry["counts"])
        assert counts.shape == (2, 3, 3)  # H - 1 step pairs of (M0, M1, SKIP)
        assert counts.sum() == stats.tokens * 2 * 2 * 2  # tokens x step pairs x K x K
        # the picks at step h (rows) and at step h+1 (columns) are the step counts times K
        kind = key.split("/")[1]
        for h in range(2):
            assert counts[h].sum(axis=1).tolist() == [
                2 * c for c in saved["counts"][f"chunk0/step{h}/{kind}"]
            ]
            assert counts[h].sum(axis=0).tolist() == [
                2 * c for c in saved["counts"][f"chunk0/step{h + 1}/{kind}"]
            ]
        probs = np.array(entry["probabilities"], dtype=float)
        assert np.allclose(probs.sum(axis=1), 1.0)

    for kind in ("attn", "ffn"):
        mean = np.array(saved["kl"]["mean"][kind])
        assert mean.shape == (2, 2)
        assert np.array_equal(np.diag(mean), np.zeros(2))
        assert np.allclose(mean, mean.T) and mean[0, 1] > 0
    assert saved["kl"]["epsilon"] == 1e-6
    for key, dists in saved["domain_distributions"].items():
        for name, dist in dists.items():
            counts = stats.per_domain[name].counts[key].double()
            assert np.allclose(dist, (counts / counts.sum()).numpy())


def test_moduleformer_report_through_the_cli(two_domain_data, tmp_path, capsys):  # noqa: F811
    model_dir = tmp_path / "model"
    tiny_moduleformer().save_pretrained(model_dir)
    out_dir = tmp_path / "report"
    parser = argparse.ArgumentParser()
    add_routing_report_arguments(parser)
    args = parser.parse_args(
        [str(model_dir), str(two_domain_data), "--out-dir", str(out_dir), "--block-size", "16"]
    )
    report = run_routing_report(args)
    assert "mean symmetric KL between domains (ffn)" in capsys.readouterr().out
    assert "transitions" not in report  # ModuleFormer has no steps
    for name in ("usage_heatmap.png", "domain_experts_ffn.png", "domain_kl_ffn.png"):
        assert_png(out_dir / name)
    assert (out_dir / "usage.json").is_file()
    saved = json.loads((out_dir / "report.json").read_text())
    per_key = saved["kl"]["per_key"]
    assert set(per_key) == {"layer0/attn", "layer0/ffn", "layer1/attn", "layer1/ffn"}
    for table in per_key.values():
        table = np.array(table)
        assert np.array_equal(np.diag(table), np.zeros(2)) and np.allclose(table, table.T)
    mean = np.array(saved["kl"]["mean"]["ffn"])
    assert np.allclose(
        mean, (np.array(per_key["layer0/ffn"]) + np.array(per_key["layer1/ffn"])) / 2
    )
    # The per-layer value is the smoothed symmetric KL of the two domains' counts.
    stats = UsageStats.load(out_dir / "usage.json")
    p = smoothed_distribution(stats.per_domain["code"].counts["layer1/ffn"].numpy())
    q = smoothed_distribution(stats.per_domain["prose"].counts["layer1/ffn"].numpy())
    expected = 0.5 * float(np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
    assert math.isclose(per_key["layer1/ffn"][0][1], expected, rel_tol=1e-9)


def test_kl_table_values():
    counts = {
        "a": np.array([10, 0, 0]),
        "b": np.array([5, 5, 0]),
        "c": np.array([10, 0, 0]),
    }
    eps = 1e-3
    table = kl_table(counts, eps)
    assert table.shape == (3, 3)
    assert np.array_equal(np.diag(table), np.zeros(3)) and np.allclose(table, table.T)
    assert table[0, 2] == 0.0  # same distribution
    p = np.array([1 + eps, eps, eps]) / (1 + 3 * eps)
    q = np.array([0.5 + eps, 0.5 + eps, eps]) / (1 + 3 * eps)
    expected = 0.5 * (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p)))
    assert math.isclose(table[0, 1], expected, rel_tol=1e-12)
    # an expert one domain never picks: large but finite, growing as eps shrinks
    assert np.isfinite(table).all()
    assert kl_table(counts, 1e-9)[0, 1] > table[0, 1]
    with pytest.raises(UsageError, match="epsilon must be > 0"):
        kl_table(counts, 0.0)


def test_transition_probabilities_leave_unpicked_rows_undefined():
    probs = transition_probabilities(np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]]))
    assert np.allclose(probs[0], [0.75, 0.25, 0.0]) and np.allclose(probs[2], [0.25, 0.25, 0.5])
    assert np.isnan(probs[1]).all()


def test_single_step_mom_has_no_transition_figure(tmp_path):
    stats = collect_usage(tiny_mom("K2H1S"), random_batches(1))
    assert all(t.shape == (0, 3, 3) for t in stats.transitions.values())
    report = write_routing_report(stats, tmp_path, norm="sum")
    assert report["figures"] == ["usage_heatmap.png"]  # one domain: no KL either
    assert not (tmp_path / "transitions.png").exists()
    assert "kl" not in report
    for key, usage in report["usage"].items():
        assert math.isclose(sum(usage), 1.0, rel_tol=1e-6), key


def test_bad_norm_is_a_clear_error():
    stats = UsageStats("moduleformer", {"layer0/ffn": torch.tensor([1, 2])}, tokens=1)
    with pytest.raises(UsageError, match="norm must be"):
        build_report(stats, norm="l2")

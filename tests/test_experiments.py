"""The experiments' shared machinery: paired statistics, verdicts, resumable arms, tables."""

from __future__ import annotations

import math

import pytest

from modformer.experiments.common import ArmResult, compare, results_table, run_arm


def result(arm: str, seed: int, loss: float) -> ArmResult:
    return ArmResult(arm, seed, loss, 1000, 800.0, 2e6, 10_000, 10, 1.0)


def test_paired_difference_standard_error_and_verdicts():
    base = [3.00, 3.10, 2.90]
    results = [result("base", s, v) for s, v in enumerate(base)]
    # Lower by 0.1 at every seed: a paired SE of 0 however noisy the seeds are.
    results += [result("better", s, v - 0.1) for s, v in enumerate(base)]
    # Differences -0.05, +0.05, 0.0: mean 0, within noise.
    results += [result("same", s, v + d) for s, (v, d) in enumerate(zip(base, (-0.05, 0.05, 0)))]
    better = compare(results, "better", "base")
    assert better.diff_mean == pytest.approx(-0.1) and better.diff_se == pytest.approx(0, abs=1e-12)
    assert better.verdict == "lower" and better.seeds == [0, 1, 2]
    assert better.sd == pytest.approx(0.1)
    same = compare(results, "same", "base")
    assert same.diff_se == pytest.approx(0.05 / math.sqrt(3)) and same.verdict == "within noise"
    one = compare([result("base", 0, 3.0), result("x", 0, 2.0)], "x", "base")
    assert one.verdict == "one seed" and math.isnan(one.diff_se)
    with pytest.raises(ValueError, match="no seed has results for both"):
        compare(results, "missing", "base")


def test_run_arm_stores_and_resumes(tmp_path):
    calls = []

    def train(run_dir):
        calls.append(run_dir)
        return result("a", 3, 2.5)

    first = run_arm(tmp_path, "a", 3, train)
    again = run_arm(tmp_path, "a", 3, train)
    assert first == again and len(calls) == 1  # the second call read the stored result
    assert (tmp_path / "arms" / "a" / "seed_3.json").is_file()


def test_results_table_lists_each_arm_against_the_baseline():
    results = [result("base", s, 3.0 + s / 10) for s in range(3)]
    results += [result("moe", s, 2.8 + s / 10) for s in range(3)]
    table = results_table(results, "base", ["base", "moe"])
    assert "| base | 3 | 3.1000 +- 0.1000 | (baseline) |" in table
    assert "| moe | 3 | 2.9000 +- 0.1000 | -0.2000 +- 0.0000 | lower |" in table

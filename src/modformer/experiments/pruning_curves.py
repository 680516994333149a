"""Loss-versus-kept-parameters curves and their comparison at equal parameters, for the
pruning experiment (`modformer.experiments.moduleformer_pruning`).

A *curve* is one method's points at one seed: (kept-parameter ratio, validation loss),
one per threshold (expert pruning) or per layer count (layer dropping), plus the unpruned
model at ratio 1. Two methods rarely land on the same ratio (layer dropping moves in
steps of a whole layer), so a point of method A is compared with method B *interpolated
linearly at A's ratio* on the same seed; a ratio outside B's range is not compared (no
extrapolation). The paired differences over seeds then go through
`modformer.experiments.common.compare` like any arm against its baseline.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modformer.experiments.common import ArmResult, Comparison, compare


@dataclass(frozen=True)
class Point:
    """One pruned (or layer-dropped) model of a curve."""

    label: str  # "tau0.3" or "layers2"
    params_ratio: float
    val_loss: float
    total_params: int
    active_params: float
    flops_per_token: float


def interpolate(curve: Sequence[tuple[float, float]], ratio: float) -> float | None:
    """The loss of `curve` ((ratio, loss) pairs) linearly interpolated at `ratio`; None
    outside the curve's ratios. Points at one ratio are averaged."""
    by_ratio: dict[float, list[float]] = {}
    for r, loss in curve:
        by_ratio.setdefault(r, []).append(loss)
    xs = sorted(by_ratio)
    ys = [statistics.fmean(by_ratio[x]) for x in xs]
    if not xs or not xs[0] - 1e-12 <= ratio <= xs[-1] + 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:]), strict=False):
        if x0 <= ratio <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    return ys[0] if len(xs) == 1 or ratio <= xs[0] else ys[-1]


@dataclass
class Matched:
    """Method `arm` at one point label against `baseline` at equal parameters."""

    arm: str
    label: str
    baseline: str
    ratio_mean: float
    ratio_sd: float
    comparison: Comparison | None  # None: no seed's ratio lies within the baseline's range


def matched_comparison(
    curves: dict[tuple[str, int], list[Point]], arm: str, label: str, baseline: str
) -> Matched:
    """`arm`'s point `label` against `baseline`'s curve interpolated at its ratio, paired
    by seed."""
    rows: list[ArmResult] = []
    ratios = []
    for (name, seed), points in curves.items():
        if name != arm:
            continue
        point = next((p for p in points if p.label == label), None)
        base = curves.get((baseline, seed))
        if point is None or base is None:
            continue
        ratios.append(point.params_ratio)
        matched = interpolate([(p.params_ratio, p.val_loss) for p in base], point.params_ratio)
        if matched is None:
            continue
        a, b = f"{arm}@{label}", f"{baseline}~{arm}@{label}"
        for name_, loss in ((a, point.val_loss), (b, matched)):
            rows.append(ArmResult(name_, seed, loss, 0, 0.0, 0.0, 0, 0, 0.0))
    mean = statistics.fmean(ratios) if ratios else float("nan")
    sd = statistics.stdev(ratios) if len(ratios) > 1 else float("nan")
    comparison = compare(rows, f"{arm}@{label}", f"{baseline}~{arm}@{label}") if rows else None
    return Matched(arm, label, baseline, mean, sd, comparison)


def _ms(values: Sequence[float], digits: int = 4) -> str:
    values = list(values)
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    sd_text = "n/a" if math.isnan(sd) else f"{sd:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} +- {sd_text}"


def curves_table(curves: dict[tuple[str, int], list[Point]], arms: Sequence[str]) -> str:
    """Per method and point: kept-parameter ratio and loss, mean +- sd over seeds."""
    lines = [
        "| method | point | seeds | kept params (ratio) | val loss | FLOPs/token |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        labels: list[str] = []
        for (name, _), points in sorted(curves.items()):
            if name == arm:
                labels += [p.label for p in points if p.label not in labels]
        for label in labels:
            points = [
                p for (name, _), ps in curves.items() if name == arm for p in ps if p.label == label
            ]
            flops = statistics.fmean(p.flops_per_token for p in points)
            lines.append(
                f"| {arm} | {label} | {len(points)} | {_ms([p.params_ratio for p in points], 3)} "
                f"| {_ms([p.val_loss for p in points])} | {flops / 1e6:.2f}M |"
            )
    return "\n".join(lines)


def matched_table(rows: Sequence[Matched]) -> str:
    lines = [
        "| method @ point | kept params (ratio) | vs (interpolated at equal params) | seeds "
        "| loss | diff +- SE | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        ratio = f"{m.ratio_mean:.3f} +- {m.ratio_sd:.3f}"
        c = m.comparison
        if c is None:
            lines.append(
                f"| {m.arm} @ {m.label} | {ratio} | {m.baseline} | 0 | - | - "
                "| outside the baseline's range |"
            )
            continue
        se = "n/a" if math.isnan(c.diff_se) else f"{c.diff_se:.4f}"
        lines.append(
            f"| {m.arm} @ {m.label} | {ratio} | {m.baseline} | {len(c.seeds)} | {c.mean:.4f} "
            f"| {c.diff_mean:+.4f} +- {se} | {c.verdict} |"
        )
    return "\n".join(lines)


def matched_payload(rows: Sequence[Matched]) -> list[dict[str, Any]]:
    out = []
    for m in rows:
        c = m.comparison
        out.append(
            {
                "arm": m.arm,
                "point": m.label,
                "baseline": m.baseline,
                "params_ratio_mean": m.ratio_mean,
                "params_ratio_sd": m.ratio_sd,
                "comparison": None if c is None else c.__dict__,
            }
        )
    return out


def plot_curves(
    curves: dict[tuple[str, int], list[Point]], arms: Sequence[str], path: Path, title: str
) -> Path | None:
    """Loss against kept-parameter ratio, mean over seeds per point, one line per method
    (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        by_label: dict[str, list[Point]] = {}
        for (name, _), points in curves.items():
            if name == arm:
                for p in points:
                    by_label.setdefault(p.label, []).append(p)
        xy = sorted(
            (statistics.fmean(p.params_ratio for p in ps), statistics.fmean(p.val_loss for p in ps))
            for ps in by_label.values()
        )
        if xy:
            ax.plot(*zip(*xy, strict=True), marker="o", label=arm)
    ax.set_xlabel("kept parameters (ratio to the unpruned model)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

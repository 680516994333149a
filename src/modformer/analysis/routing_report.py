"""Routing reports: how a modular model uses its modules, as PNG figures plus report.json.

From a `UsageStats` (see `usage.py`):

- ``usage_heatmap.png``: per-step module usage. MoM: a row per chunk step, a column per
  module plus SKIP; ModuleFormer: a row per layer, a column per expert, one panel for the
  attention experts and one for the FFN experts. Cells are the usage frequencies
  normalised within the row (by the max, as ModuleFormer's pruning, or by the sum).
- ``transitions.png`` (MoM, H >= 2; paper Figure 6): for each chunk and module type, the
  probability that a token picks module j at step h+1 given it picked module i at step h,
  pooled over the step pairs (each (i, j) pick pair counts once; K x K pairs per token).
  Rows that were never picked are blank.
- ``domain_experts_<kind>.png`` (data with two or more domains; ModuleFormer Figure 2):
  for each layer, each domain's distribution over the experts (counts / their sum).
- ``domain_kl_<kind>.png``: the pairwise divergence between the domains' expert
  distributions, averaged over layers.

The divergence is the symmetrised KL divergence ``(KL(p||q) + KL(q||p)) / 2`` in nats,
so the table is symmetric with zeros on the diagonal (the paper does not say which
direction it uses; a symmetric table reads the same both ways). Before it is computed each
distribution is smoothed as ``p = (f + eps) / sum(f + eps)`` with ``f`` the sum-normalised
counts and ``eps = 1e-6`` by default, so an expert that one domain never picks gives a
large but finite divergence instead of infinity. The MoM report computes the same tables
over its chunk steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from modformer.analysis.usage import UsageError, UsageStats
from modformer.defaults import DEFAULT_KL_EPSILON, NORMS
from modformer.models.routed import POOL_KINDS

# ---- numbers -----------------------------------------------------------------------------


def usage_rows(stats: UsageStats, kind: str, norm: str = "max") -> tuple[list[str], np.ndarray]:
    """(row labels, (rows, max choices) frequency matrix) of one decision type; rows with
    fewer choices (a smaller chunk) are padded with NaN."""
    freqs = stats.frequencies(norm)
    keys = [key for key in stats.counts if key.rsplit("/", 1)[1] == kind]
    width = max((freqs[key].numel() for key in keys), default=0)
    matrix = np.full((len(keys), width), np.nan)
    for row, key in enumerate(keys):
        values = freqs[key].numpy()
        if stats.skip and values.size < width:  # keep SKIP in the last column
            matrix[row, : values.size - 1] = values[:-1]
            matrix[row, -1] = values[-1]
        else:
            matrix[row, : values.size] = values
    return [key.rsplit("/", 1)[0] for key in keys], matrix


def transition_probabilities(counts: np.ndarray) -> np.ndarray:
    """(C, C) pick-pair counts -> row-normalised P(next = j | current = i); rows with no
    picks are NaN (undefined, not zero)."""
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def smoothed_distribution(counts: np.ndarray, eps: float = DEFAULT_KL_EPSILON) -> np.ndarray:
    """``(f + eps) / sum(f + eps)`` with ``f = counts / counts.sum()`` (see module docstring)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    f = counts / total if total > 0 else np.zeros_like(counts)
    smoothed = f + eps
    return smoothed / smoothed.sum()


def symmetric_kl(p: np.ndarray, q: np.ndarray) -> float:
    """``(KL(p||q) + KL(q||p)) / 2`` in nats for strictly positive distributions."""
    log_ratio = np.log(p) - np.log(q)
    return float(0.5 * (np.sum(p * log_ratio) - np.sum(q * log_ratio)))


def kl_table(
    per_domain_counts: dict[str, np.ndarray], eps: float = DEFAULT_KL_EPSILON
) -> np.ndarray:
    """(D, D) symmetric KL between the smoothed distributions of each pair of domains."""
    if eps <= 0:
        raise UsageError(f"the KL smoothing epsilon must be > 0, got {eps}")
    dists = [smoothed_distribution(c, eps) for c in per_domain_counts.values()]
    n = len(dists)
    table = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            table[i, j] = table[j, i] = symmetric_kl(dists[i], dists[j])
    return table


def build_report(
    stats: UsageStats, norm: str = "max", eps: float = DEFAULT_KL_EPSILON
) -> dict[str, Any]:
    """Every number the figures show, as JSON-ready lists."""
    if norm not in NORMS:
        raise UsageError(f"norm must be 'max' or 'sum', got {norm!r}")
    report: dict[str, Any] = {
        "arch": stats.arch,
        "tokens": stats.tokens,
        "norm": norm,
        "skip": stats.skip,
        "usage": {key: f.tolist() for key, f in stats.frequencies(norm).items()},
        "counts": {key: c.tolist() for key, c in stats.counts.items()},
    }
    if stats.transitions is not None:
        report["transitions"] = {}
        for key, t in stats.transitions.items():
            counts = t.numpy()
            pooled = counts.sum(axis=0)
            report["transitions"][key] = {
                "labels": stats.column_labels(pooled.shape[0]),
                "counts": counts.tolist(),  # (H-1, C, C): [h, i, j] = i at step h, j at h+1
                "probabilities": _nan_to_none(transition_probabilities(pooled)),
            }
    domains = list(stats.per_domain or {})
    if len(domains) >= 2:
        report["domains"] = domains
        report["domain_distributions"] = {
            key: {
                name: normalize_sum(stats.per_domain[name].counts[key].numpy()) for name in domains
            }
            for key in stats.counts
        }
        per_key = {
            key: kl_table(
                {name: stats.per_domain[name].counts[key].numpy() for name in domains}, eps
            )
            for key in stats.counts
        }
        mean = {}
        for kind in POOL_KINDS:
            tables = [t for key, t in per_key.items() if key.rsplit("/", 1)[1] == kind]
            if tables:
                mean[kind] = np.mean(tables, axis=0).tolist()
        report["kl"] = {
            "definition": "(KL(p||q) + KL(q||p)) / 2 in nats, p = (f + eps) / sum(f + eps), "
            "f = a domain's counts / their sum",
            "epsilon": eps,
            "per_key": {key: t.tolist() for key, t in per_key.items()},
            "mean": mean,
        }
    return report


def normalize_sum(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return (counts / total if total > 0 else np.zeros(counts.shape)).tolist()


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in matrix]


# ---- figures -----------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Any:
    """A bare `Figure` on the Agg canvas: no pyplot, no global state, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: Path) -> Path:
    """Write a PNG atomically (temp file + rename)."""
    from modformer.utils import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110)
    return path


def _heatmap(
    axes: Any,
    matrix: np.ndarray,
    row_labels: list[str],
    col_labels: list[str],
    title: str,
    annotate: bool = True,
    vmax: float | None = None,
    cmap: str = "viridis",
    fmt: str = ".2f",
) -> Any:
    """imshow with labelled ticks and (for small matrices) the values written in."""
    image = axes.imshow(matrix, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax)
    axes.set_title(title, fontsize="medium")
    axes.set_xticks(range(len(col_labels)), col_labels, fontsize="small")
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize="small")
    if annotate and matrix.size <= 400:
        top = np.nanmax(matrix) if np.isfinite(matrix).any() else 1.0
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                color = "black" if value > 0.6 * (vmax or top) else "white"
                axes.text(
                    j, i, format(value, fmt), ha="center", va="center", fontsize=7, color=color
                )
    return image


def plot_usage_heatmap(stats: UsageStats, path: Path, norm: str = "max") -> Path:
    kinds = POOL_KINDS
    rows = [usage_rows(stats, kind, norm) for kind in kinds]
    height = max(2.5, 0.35 * max(len(labels) for labels, _ in rows) + 1.5)
    width = max(6.0, 0.5 * sum(m.shape[1] for _, m in rows) + 4)
    figure = new_figure(width, height)
    panels = figure.subplots(1, 2)
    what = stats.choice_name
    for axes, kind, (labels, matrix) in zip(panels, kinds, rows):
        image = _heatmap(
            axes, matrix, labels, stats.column_labels(matrix.shape[1]), f"{kind} {what} usage"
        )
        figure.colorbar(image, ax=axes, shrink=0.8, label=f"frequency / {norm}")
    figure.suptitle(f"{stats.arch}: {what} usage over {stats.tokens:,} tokens")
    return save_figure(figure, path)


def plot_transitions(stats: UsageStats, path: Path) -> Path | None:
    """One row of panels per chunk: attention and FFN transition probabilities pooled over
    step pairs. None when no chunk has two steps."""
    if not stats.transitions or all(t.shape[0] == 0 for t in stats.transitions.values()):
        return None
    chunks = sorted({key.split("/")[0] for key in stats.transitions}, key=lambda c: int(c[5:]))
    kinds = POOL_KINDS
    figure = new_figure(10, 4.2 * len(chunks))
    panels = np.atleast_2d(figure.subplots(len(chunks), 2, squeeze=False))
    for row, chunk in enumerate(chunks):
        for col, kind in enumerate(kinds):
            counts = stats.transitions[f"{chunk}/{kind}"].numpy().sum(axis=0)
            labels = stats.column_labels(counts.shape[0])
            image = _heatmap(
                panels[row, col],
                transition_probabilities(counts),
                labels,
                labels,
                f"{chunk} {kind}: P(step h+1 | step h)",
                vmax=1.0,
            )
            panels[row, col].set_xlabel("module at step h+1")
            panels[row, col].set_ylabel("module at step h")
        figure.colorbar(image, ax=panels[row].tolist(), shrink=0.8)
    figure.suptitle("MoM routing transitions between consecutive steps")
    return save_figure(figure, path)


def plot_domain_distributions(stats: UsageStats, report: dict, kind: str, path: Path) -> Path:
    """One panel per layer/step: a row per domain, a column per expert/module."""
    keys = [key for key in stats.counts if key.rsplit("/", 1)[1] == kind]
    domains = report["domains"]
    columns = min(4, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = new_figure(3.6 * columns + 1, 0.3 * len(domains) * rows + 1.6 * rows + 0.8)
    panels = figure.subplots(rows, columns, squeeze=False)
    for index, key in enumerate(keys):
        axes = panels[index // columns, index % columns]
        matrix = np.array([report["domain_distributions"][key][d] for d in domains])
        image = _heatmap(
            axes,
            matrix,
            domains,
            stats.column_labels(matrix.shape[1]),
            key.rsplit("/", 1)[0],
            annotate=matrix.size <= 64,
        )
    for index in range(len(keys), rows * columns):
        panels[index // columns, index % columns].set_visible(False)
    figure.colorbar(image, ax=panels.ravel().tolist(), shrink=0.8, label="share of picks")
    figure.suptitle(f"{kind}: {stats.choice_name} distribution per domain")
    return save_figure(figure, path)


def plot_domain_kl(report: dict, kind: str, path: Path) -> Path:
    domains = report["domains"]
    table = np.array(report["kl"]["mean"][kind])
    size = 2.0 + 0.6 * len(domains)
    figure = new_figure(size + 2.0, size)
    axes = figure.subplots()
    image = _heatmap(
        axes,
        table,
        domains,
        domains,
        f"{kind}: symmetric KL between domains\n(nats, mean over layers)",
        cmap="magma",
        fmt=".3g",
    )
    axes.tick_params(axis="x", labelrotation=45)
    figure.colorbar(image, ax=axes, shrink=0.8, label="nats")
    return save_figure(figure, path)


def write_routing_report(
    stats: UsageStats,
    out_dir: str | os.PathLike,
    norm: str = "max",
    eps: float = DEFAULT_KL_EPSILON,
) -> dict[str, Any]:
    """Write the figures and ``report.json`` (the numbers plus the figure names)."""
    from modformer.utils import atomic_write_text

    out_dir = Path(out_dir)
    report = build_report(stats, norm, eps)
    figures = [plot_usage_heatmap(stats, out_dir / "usage_heatmap.png", norm)]
    transitions = plot_transitions(stats, out_dir / "transitions.png")
    if transitions is not None:
        figures.append(transitions)
    if "domains" in report:
        for kind in POOL_KINDS:
            figures.append(
                plot_domain_distributions(
                    stats, report, kind, out_dir / f"domain_experts_{kind}.png"
                )
            )
            figures.append(plot_domain_kl(report, kind, out_dir / f"domain_kl_{kind}.png"))
    report["figures"] = [p.name for p in figures]
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    return report

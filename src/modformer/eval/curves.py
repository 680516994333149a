"""Training curves from the trainer's ``metrics.jsonl``: training and validation loss of
one or more runs, against optimizer steps or training tokens, as one PNG.

``metrics.jsonl`` holds one JSON object per line. Training records carry ``step``,
``loss`` and ``tokens_seen``; evaluation records carry ``step`` and ``val_loss`` (the final
record too). Validation records have no token count: it is derived from the run's
tokens per step, which the trainer keeps constant.

``modformer plot-curves RUN_DIR... --out curves.png`` draws them from the command line.
The figure is built without pyplot (a bare ``Figure`` on the Agg canvas), so plotting
changes no global matplotlib state and needs no display.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.jsonl"
X_AXES = ("step", "tokens")


@dataclass
class RunCurves:
    """The loss series of one run: (x, value) arrays, x in steps."""

    name: str
    train_steps: np.ndarray
    train_loss: np.ndarray
    val_steps: np.ndarray
    val_loss: np.ndarray
    tokens_per_step: float | None


def metrics_path(path: str | Path) -> Path:
    """A run directory (holding metrics.jsonl) or the metrics file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise ValueError(
            f"no metrics file at {str(path)!r}; pass a training out_dir (which holds "
            f"{METRICS_FILE}) or the path of a {METRICS_FILE}"
        )
    return path


def read_curves(path: str | Path, name: str | None = None) -> RunCurves:
    """The training and validation loss series of one run's metrics file."""
    path = metrics_path(path)
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    tokens_per_step = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} line {number} is not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{str(path)!r} line {number} is not a record with an integer step")
        step = record["step"]
        # A resumed run rewrites the steps after its checkpoint: the later value wins.
        if isinstance(record.get("loss"), (int, float)):
            train[step] = float(record["loss"])
            if isinstance(record.get("tokens_seen"), (int, float)) and step > 0:
                tokens_per_step = record["tokens_seen"] / step
        if isinstance(record.get("val_loss"), (int, float)):
            val[step] = float(record["val_loss"])
    if not train and not val:
        raise ValueError(
            f"{str(path)!r} holds no loss or val_loss records; is it a `modformer train` "
            "metrics file of a run that has logged at least once?"
        )
    train_steps = np.array(sorted(train), dtype=np.int64)
    val_steps = np.array(sorted(val), dtype=np.int64)
    return RunCurves(
        name=name if name is not None else _run_name(path),
        train_steps=train_steps,
        train_loss=np.array([train[s] for s in train_steps], dtype=np.float64),
        val_steps=val_steps,
        val_loss=np.array([val[s] for s in val_steps], dtype=np.float64),
        tokens_per_step=tokens_per_step,
    )


def _run_name(metrics_file: Path) -> str:
    return metrics_file.parent.name or str(metrics_file)


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0.0 or values.size == 0:
        return values
    out = np.empty_like(values)
    average = 0.0
    for i, value in enumerate(values):
        average = smoothing * average + (1.0 - smoothing) * value
        out[i] = average / (1.0 - smoothing ** (i + 1))
    return out


def plot_training_curves(
    metrics_jsonl_paths: Sequence[str | Path],
    out_png: str | Path,
    labels: Sequence[str] | None = None,
    x_axis: str = "step",
    smoothing: float = 0.0,
    log_y: bool = False,
    title: str | None = None,
    x_offsets: Sequence[float] | None = None,
) -> Path:
    """Training loss (left) and validation loss (right) of each run, one colour per run.

    Args:
        metrics_jsonl_paths: metrics.jsonl files or the run directories holding them.
        out_png: the PNG to write (atomically; parent directories are created).
        labels: legend names, one per run (default: each run directory's name).
        x_axis: "step" (optimizer steps) or "tokens" (training tokens seen).
        smoothing: EMA factor in [0, 1) applied to the training loss only.
        log_y: logarithmic loss axis.
        x_offsets: per run, where its x axis starts (in steps or tokens, as `x_axis`): a
            phase-2 run continues from its phase-1 model, so it is drawn from the phase-1
            run's last step or token count rather than from 0.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not metrics_jsonl_paths:
        raise ValueError("no runs given; pass at least one metrics.jsonl or run directory")
    if labels is not None and len(labels) != len(metrics_jsonl_paths):
        raise ValueError(
            f"{len(labels)} labels for {len(metrics_jsonl_paths)} runs; give one label per run"
        )
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {X_AXES}, got {x_axis!r}")
    if x_offsets is not None and len(x_offsets) != len(metrics_jsonl_paths):
        raise ValueError(
            f"{len(x_offsets)} x offsets for {len(metrics_jsonl_paths)} runs; give one per run"
        )
    offsets = list(x_offsets) if x_offsets is not None else [0.0] * len(metrics_jsonl_paths)
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise ValueError(f"the output {str(out_png)!r} must be a .png file")
    runs = [
        read_curves(path, labels[i] if labels is not None else None)
        for i, path in enumerate(metrics_jsonl_paths)
    ]

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    train_axes, val_axes = figure.subplots(1, 2, sharey=True)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color, offset in zip(runs, colors, offsets):
        scale = _x_scale(run, x_axis)
        if run.train_steps.size:
            train_axes.plot(
                offset + run.train_steps * scale,
                ema(run.train_loss, smoothing),
                color=color,
                marker="o" if run.train_steps.size == 1 else None,  # a lone point is no line
                label=run.name,
            )
        if run.val_steps.size:
            val_axes.plot(
                offset + run.val_steps * scale,
                run.val_loss,
                color=color,
                marker="o",
                label=run.name,
            )
    x_label = "optimizer step" if x_axis == "step" else "training tokens"
    smoothed = f" (EMA {smoothing:g})" if smoothing else ""
    for axes, name in ((train_axes, f"training loss{smoothed}"), (val_axes, "validation loss")):
        axes.set_title(name)
        axes.set_xlabel(x_label)
        axes.grid(alpha=0.3)
        if log_y:
            axes.set_yscale("log")
        if axes.has_data():
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no records", ha="center", va="center", transform=axes.transAxes)
    train_axes.set_ylabel("loss (nats/token)")
    if title:
        figure.suptitle(title)
    _atomic_savefig(figure, out_png)
    return out_png


def run_length(path: str | Path, x_axis: str = "tokens") -> float:
    """How far a run got, in steps or training tokens: where a run that continues from its
    final model starts on the same axis."""
    run = read_curves(path)
    last = max(run.train_steps[-1] if run.train_steps.size else 0, run.val_steps.max(initial=0))
    return float(last * _x_scale(run, x_axis))


def _x_scale(run: RunCurves, x_axis: str) -> float:
    if x_axis == "step":
        return 1.0
    if run.tokens_per_step is None:
        raise ValueError(
            f"run {run.name!r} logs no tokens_seen, so it cannot be plotted against tokens; "
            "use x_axis='step'"
        )
    return run.tokens_per_step


def _atomic_savefig(figure, out_png: Path) -> None:
    from modformer.utils import atomic_path

    with atomic_path(out_png, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=120)

"""Hyper-parameter sweeps: train one model per grid point, tabulate and plot val loss.

``modformer sweep --base-config cfg.yaml --grid model.overrides.K=1,2,3,4
--grid model.overrides.H=1,2,3,4,5,6 --out-dir DIR`` is MoM's Figure 4 experiment: every
point trains with the base configuration (`modformer train` settings: the file, then
``--set`` overrides, then the point's grid values, then ``--steps``) into
``DIR/points/<name>`` with `modformer.train.trainer.train`, and the sweep writes

- ``DIR/results.json`` and ``DIR/results.csv``: per point the grid values, final val loss
  and perplexity, parameter count, steps and training tokens;
- ``DIR/sweep.png``: val loss against the grid. One axis: a line; two axes: val loss
  against the second axis with one line per value of the first (Figure 4: lines per K
  against H) beside a heatmap of the same numbers. More axes: the table only.

Resumable: a point whose ``final.json`` exists is read, not retrained (its recorded
settings must match; otherwise the sweep stops and says so), and a point interrupted
midway continues from its latest checkpoint (``train(cfg, resume=True)``). Every point's
configuration, including its model configuration, is built and checked before the
first one trains, so a bad grid fails at once.

Phase-2 MoM sweeps (the paper's setting): with ``--init-from-vanilla DIR`` each point
converts the trained vanilla model with `mom_from_vanilla` into ``DIR/points/<name>/init``
(K, H and SKIP from the point's ``model.overrides.K/H/skip`` (or ``mom``), the chunk
string from ``model.overrides.chunks``, other overrides as MoM config fields) and trains
from there.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modformer.config import ConfigError, from_dict, load_file, parse_override, set_path

log = logging.getLogger("modformer.sweep")

POINTS_DIR = "points"
POINT_FILE = "point.json"  # the point's full training configuration, written before training
# Settings whose change makes a finished point's result a different experiment.
RESULT_SETTINGS = (
    "model",
    "data",
    "optim",
    "seed",
    "max_steps",
    "batch_size",
    "grad_accum",
    "precision",
)
# Grid keys the sweep owns.
RESERVED_KEYS = ("out_dir",)
MOM_NAME_KEYS = ("K", "H", "skip", "mom")


class SweepError(ConfigError):
    """A bad sweep specification or a sweep directory that does not match it."""


@dataclass
class GridAxis:
    """One ``--grid KEY=V1,V2,...``: a dotted setting and its values (YAML scalars)."""

    key: str
    values: list[Any]

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]


@dataclass
class SweepPoint:
    name: str
    values: dict[str, Any]  # grid key -> value
    settings: dict[str, Any]  # the full nested training settings
    init_overrides: dict[str, Any] | None = None  # MoM conversion arguments (phase 2)
    vanilla_dir: Path | None = None  # the phase-1 model converted into init/ (phase 2)

    @property
    def out_dir(self) -> Path:
        return Path(self.settings["out_dir"])


def parse_grid(spec: str) -> GridAxis:
    """``model.overrides.K=1,2,3`` -> GridAxis("model.overrides.K", [1, 2, 3])."""
    if "=" not in spec:
        raise SweepError(
            f"--grid {spec!r} must look like SECTION.FIELD=V1,V2,..., e.g. "
            "model.overrides.K=1,2,3,4"
        )
    key, raw = spec.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SweepError(f"--grid {spec!r}: the setting name is empty or malformed")
    if key in RESERVED_KEYS:
        raise SweepError(f"--grid {key}: the sweep sets {key} itself (DIR/points/<name>)")
    texts = [text.strip() for text in raw.split(",")]
    if not raw.strip() or any(not text for text in texts):
        raise SweepError(
            f"--grid {spec!r}: give a non-empty comma-separated list of values, e.g. {key}=1,2"
        )
    values = [_grid_value(text) for text in texts]
    if len(set(map(repr, values))) != len(values):
        raise SweepError(f"--grid {spec!r} lists a value twice")
    return GridAxis(key, values)


def _grid_value(text: str) -> Any:
    """Numbers (including YAML 1.1's strings such as 3e-4), then YAML scalars (true, gru);
    text that YAML reads as a list or mapping, such as a chunk string "[1-2-1]", stays text."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    value = parse_override(f"x={text}")[1]
    return text if isinstance(value, (list, dict)) else value


def _value_text(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def point_name(axes: list[GridAxis], values: tuple[Any, ...]) -> str:
    """``K2_H3``: each axis' last key part and value (full keys when last parts clash)."""
    shorts = [axis.short for axis in axes]
    labels = shorts if len(set(shorts)) == len(shorts) else [a.key.replace(".", "-") for a in axes]
    return "_".join(f"{label}{_value_text(v)}" for label, v in zip(labels, values))


# ---- building the points -----------------------------------------------------------------


def _vanilla_config(vanilla: str | Path) -> tuple[Path, Any]:
    """(model directory, GPTConfig) of the phase-1 model behind --init-from-vanilla."""
    from modformer.convert.mom import load_vanilla
    from modformer.models.gpt import GPTConfig
    from modformer.models.loading import resolve_model_dir

    try:
        model_dir = resolve_model_dir(vanilla)
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        if model_type == GPTConfig.model_type:
            return model_dir, GPTConfig.from_pretrained(model_dir)
        return model_dir, load_vanilla(model_dir).config  # a HF GPT-2 directory (or an error)
    except (OSError, ValueError) as error:
        raise SweepError(f"--init-from-vanilla: {error}") from None


def _check_model_config(point: SweepPoint, vanilla_config: Any | None) -> None:
    """Build the point's model configuration (no weights) so a bad value fails now."""
    from huggingface_hub.errors import StrictDataclassError

    from modformer.data.dataset import read_meta
    from modformer.models.registry import build_config

    model = point.settings.get("model", {})
    arch = "mom" if vanilla_config is not None else model.get("arch", "gpt")
    overrides = point.init_overrides if vanilla_config is not None else model.get("overrides")
    _check_override_names(point.name, arch, overrides or {})
    try:
        if vanilla_config is not None:
            from modformer.convert.mom import mom_config_from_gpt

            chunks, name, rest = _conversion_arguments(point.init_overrides or {})
            mom_config_from_gpt(vanilla_config, chunks, name, **rest)
        elif not model.get("init_from"):
            vocab = read_meta(point.settings.get("data", {}).get("dir", "data/default"))
            overrides = dict(model.get("overrides") or {})
            overrides.setdefault("vocab_size", vocab["vocab_size"])
            build_config(model.get("arch", "gpt"), model.get("preset", "tiny"), **overrides)
    except StrictDataclassError as error:
        cause = error.__cause__ or error
        raise SweepError(f"grid point {point.name}: model config: {cause}") from None
    except (ValueError, TypeError) as error:
        raise SweepError(f"grid point {point.name}: {error}") from None


def _check_override_names(name: str, arch: str, overrides: dict[str, Any]) -> None:
    """Model configs keep unknown keyword arguments as extra attributes, so a misspelt
    override would train the unchanged model: reject names that are not config fields."""
    import dataclasses
    import difflib

    from modformer.models.registry import ARCHITECTURES

    if arch not in ARCHITECTURES:
        return  # load_train_config has already named the bad arch
    config_cls = ARCHITECTURES[arch][0]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SweepError(
                f"grid point {name}: model.overrides.{key} is not a field of "
                f"{config_cls.__name__} (arch {arch!r}){hint}"
            )


def _conversion_arguments(overrides: dict[str, Any]) -> tuple[str | None, str | None, dict]:
    """model.overrides -> (chunks, MoM name "K{K}H{H}[S]" or None, other MoM fields)."""
    from modformer.models.mom import MoMConfig

    rest = dict(overrides)
    chunks = rest.pop("chunks", None)
    named = {key: rest.pop(key) for key in MOM_NAME_KEYS if key in rest}
    if "mom" in named:
        if set(named) != {"mom"}:
            raise SweepError("set either model.overrides.mom or K/H/skip, not both")
        return chunks, named["mom"], rest
    if not named:
        return chunks, None, rest
    default = MoMConfig()
    K, H = named.get("K", default.K), named.get("H", default.H)
    skip = named.get("skip", default.skip)
    if not isinstance(skip, bool):
        raise SweepError(f"model.overrides.skip must be true or false, got {skip!r}")
    return chunks, f"K{K}H{H}" + ("S" if skip else ""), rest


def build_points(
    base_config: str | Path | None,
    sets: list[str],
    axes: list[GridAxis],
    out_dir: str | Path,
    steps: int | None = None,
    init_from_vanilla: str | Path | None = None,
) -> list[SweepPoint]:
    """Every grid point's full settings, each validated as a training configuration and
    its model configuration built, before anything trains."""
    from modformer.train.config import load_train_config

    if not axes:
        raise SweepError("give at least one --grid SECTION.FIELD=V1,V2,...")
    keys = [axis.key for axis in axes]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a setting appears in two --grid options: {keys}")
    if steps is not None and steps < 1:
        raise SweepError(f"--steps must be >= 1, got {steps}")
    if steps is not None and "max_steps" in keys:
        raise SweepError("--steps and --grid max_steps=... both set max_steps; drop one")
    base = load_file(base_config) if base_config else {}
    for text in sets:
        key, value = parse_override(text)
        set_path(base, key, value)
    vanilla = vanilla_config = None
    if init_from_vanilla is not None:
        vanilla, vanilla_config = _vanilla_config(init_from_vanilla)
        if base.get("model", {}).get("init_from"):
            raise SweepError(
                "model.init_from is set but --init-from-vanilla makes each point's initial "
                "model; drop one of them"
            )
    elif base.get("model", {}).get("init_from") and any(
        k.startswith("model.overrides.") for k in keys
    ):
        raise SweepError(
            "the grid changes model.overrides, but model.init_from is set, so the trainer "
            "would ignore them; for a phase-2 MoM sweep pass --init-from-vanilla DIR instead"
        )

    points, names = [], set()
    for combo in itertools.product(*(axis.values for axis in axes)):
        name = point_name(axes, combo)
        if name in names:
            raise SweepError(
                f"two grid points get the directory name {name!r}; use distinct values"
            )
        names.add(name)
        settings = copy.deepcopy(base)
        for key, value in zip(keys, combo):
            set_path(settings, key, value)
        point_dir = Path(out_dir) / POINTS_DIR / name
        settings["out_dir"] = str(point_dir)
        if steps is not None:
            settings["max_steps"] = steps
        init_overrides = None
        if vanilla is not None:
            model = settings.setdefault("model", {})
            init_overrides = dict(model.get("overrides") or {})
            model.update(arch="mom", init_from=str(point_dir / "init"), overrides={})
        point = SweepPoint(name, dict(zip(keys, combo)), settings, init_overrides, vanilla)
        try:
            cfg = load_train_config(None, None, copy.deepcopy(settings))
        except ConfigError as error:
            raise SweepError(f"grid point {name}: {error}") from None
        point.settings = asdict(cfg)
        _check_model_config(point, vanilla_config)
        points.append(point)
    return points


# ---- running -----------------------------------------------------------------------------


def _recorded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: settings.get(key) for key in RESULT_SETTINGS}


def _make_init(point: SweepPoint) -> None:
    """Convert the vanilla model into this point's MoM (phase-2 initialisation)."""
    import torch

    from modformer.convert.mom import mom_from_vanilla
    from modformer.models.io import atomic_save_model

    init_dir = point.out_dir / "init"
    if (init_dir / "config.json").is_file():
        return  # written atomically by an earlier run
    chunks, name, rest = _conversion_arguments(point.init_overrides or {})
    torch.manual_seed(point.settings["seed"])  # the fresh routers' initialisation
    model = mom_from_vanilla(point.vanilla_dir, chunks=chunks, mom_name=name, **rest)
    atomic_save_model(model, init_dir, tokenizer_dir=point.vanilla_dir)


def run_point(point: SweepPoint) -> tuple[dict[str, Any], str]:
    """Train one point (or read its finished result); returns (final metrics, status)."""
    from modformer.train import checkpoint as ckpt_lib
    from modformer.train.config import TrainConfig
    from modformer.train.trainer import train
    from modformer.utils import atomic_write_text

    final_path = point.out_dir / "final.json"
    record_path = point.out_dir / POINT_FILE
    recorded = _recorded_settings(point.settings)
    if record_path.is_file():
        before = json.loads(record_path.read_text(encoding="utf-8"))
        if before != recorded:
            changed = sorted(k for k in recorded if before.get(k) != recorded[k])
            raise SweepError(
                f"{point.out_dir} was trained with different settings ({', '.join(changed)}); "
                "use a new --out-dir, or delete that point's directory to retrain it"
            )
    if final_path.is_file():
        return json.loads(final_path.read_text(encoding="utf-8")), "done before"
    if point.vanilla_dir is not None:
        _make_init(point)
    atomic_write_text(record_path, json.dumps(recorded, indent=1))
    cfg = from_dict(TrainConfig, point.settings)
    resume = bool(ckpt_lib.list_checkpoints(point.out_dir / "checkpoints"))
    # The sweep owns its point directories: a point without a checkpoint restarts clean.
    final = train(cfg, resume=resume, overwrite=not resume)
    return final, "resumed" if resume else "trained"


def _row(point: SweepPoint, final: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "name": point.name,
        **point.values,
        "val_loss": final.get("val_loss"),
        "val_ppl": final.get("val_ppl"),
        "params": final.get("params"),
        "steps": final.get("step"),
        "tokens_trained": final.get("tokens_trained"),
        "status": status,
        "out_dir": str(point.out_dir),
    }


def write_results(out_dir: Path, axes: list[GridAxis], rows: list[dict[str, Any]]) -> None:
    from modformer.utils import atomic_write_text

    grid = {axis.key: axis.values for axis in axes}
    atomic_write_text(
        out_dir / "results.json", json.dumps({"grid": grid, "points": rows}, indent=1)
    )
    columns = ["name", *grid, "val_loss", "val_ppl", "params", "steps", "tokens_trained", "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "results.csv", buffer.getvalue())


def _axis_positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numeric values plot at their value; others at 0, 1, ... with text ticks."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    return list(range(len(values))), [str(v) for v in values]


def plot_sweep(axes: list[GridAxis], rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Val loss over the grid (see the module docstring); None for more than two axes."""
    from modformer.analysis.routing_report import new_figure, save_figure

    if len(axes) > 2:
        return None
    loss = {tuple(row[a.key] for a in axes): row["val_loss"] for row in rows}

    def value(combo: tuple) -> float:
        v = loss.get(combo)
        return math.nan if v is None else float(v)

    if len(axes) == 1:
        (axis,) = axes
        figure = new_figure(6, 4)
        panel = figure.subplots()
        x, ticks = _axis_positions(axis.values)
        panel.plot(x, [value((v,)) for v in axis.values], marker="o")
        panel.set_xticks(x, ticks or [str(v) for v in axis.values])
        panel.set_xlabel(axis.short)
    else:
        lines, xaxis = axes
        figure = new_figure(12, 4.5)
        panel, heat = figure.subplots(1, 2)
        x, ticks = _axis_positions(xaxis.values)
        for line in lines.values:
            ys = [value((line, v)) for v in xaxis.values]
            panel.plot(x, ys, marker="o", label=f"{lines.short}={line}")
        panel.set_xticks(x, ticks or [str(v) for v in xaxis.values])
        panel.set_xlabel(xaxis.short)
        panel.legend(fontsize="small")
        matrix = np.array([[value((a, b)) for b in xaxis.values] for a in lines.values])
        image = heat.imshow(matrix, aspect="auto", cmap="viridis_r")
        heat.set_xticks(range(len(xaxis.values)), [str(v) for v in xaxis.values])
        heat.set_yticks(range(len(lines.values)), [str(v) for v in lines.values])
        heat.set_xlabel(xaxis.short)
        heat.set_ylabel(lines.short)
        low, high = np.nanmin(matrix), np.nanmax(matrix)
        for (i, j), v in np.ndenumerate(matrix):
            if np.isfinite(v):  # dark text on the light (low-loss) end of viridis_r
                light = high == low or (v - low) / (high - low) < 0.5
                color = "black" if light else "white"
                heat.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color=color)
        heat.set_title("validation loss")
        figure.colorbar(image, ax=heat, shrink=0.8)
    panel.set_ylabel("validation loss")
    panel.grid(alpha=0.3)
    panel.set_title("validation loss per grid point")
    return save_figure(figure, path)


def format_results(axes: list[GridAxis], rows: list[dict[str, Any]]) -> str:
    header = ["point", *(a.short for a in axes), "val_loss", "params", "steps", "status"]
    lines = ["  ".join(f"{h:>12}" for h in header)]
    for row in rows:
        loss = row["val_loss"]
        cells = [
            row["name"],
            *(str(row[a.key]) for a in axes),
            "-" if loss is None else f"{loss:.4f}",
            f"{row['params']:,}" if row["params"] is not None else "-",
            str(row["steps"]),
            row["status"],
        ]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def sweep(
    base_config: str | Path | None,
    grid: list[str],
    out_dir: str | Path,
    sets: list[str] | None = None,
    steps: int | None = None,
    init_from_vanilla: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns ``{"grid", "points", "plot"}`` as written to
    results.json (``plot``: the PNG path, or None with more than two axes)."""
    axes = [parse_grid(spec) for spec in grid]
    out_dir = Path(out_dir)
    points = build_points(base_config, sets or [], axes, out_dir, steps, init_from_vanilla)
    rows: list[dict[str, Any]] = []
    for index, point in enumerate(points, 1):
        log.info("sweep point %d/%d: %s", index, len(points), point.name)
        final, status = run_point(point)
        rows.append(_row(point, final, status))
        write_results(out_dir, axes, rows)  # partial results survive an interruption
    plot = plot_sweep(axes, rows, out_dir / "sweep.png")
    return {"grid": {a.key: a.values for a in axes}, "points": rows, "plot": plot}

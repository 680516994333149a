"""What every reproduction experiment shares: arms trained over seeds, resumable results,
paired statistics against a baseline, and the JSON + markdown outputs.

An experiment (one module of this package, run by `modformer reproduce NAME`) trains
*arms* (a model and a recipe) for several seeds on the same prepared data, evaluates each
on the whole validation split, and compares every arm with a named baseline at a named
equal cost (parameters, FLOPs per token, training tokens). Each (arm, seed) result is
written to `OUT/arms/ARM/seed_S.json` as soon as it exists, so a killed experiment resumes
where it stopped; `results.json` and `results.md` are rewritten from all results at the
end.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modformer.utils import atomic_write_text

DEFAULT_SEEDS = (0, 1, 2)


@dataclass
class ArmResult:
    """One trained arm at one seed. `val_loss` is over the whole validation split."""

    arm: str
    seed: int
    val_loss: float
    total_params: int
    active_params: float
    flops_per_token: float
    train_tokens: int
    steps: int
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def arm_path(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / "arms" / arm / f"seed_{seed}.json"


def run_arm(out_dir: Path, arm: str, seed: int, train_fn: Callable[[Path], ArmResult]) -> ArmResult:
    """The stored result of (arm, seed), or train it now with `train_fn(run_dir)` and store
    it (atomically) before returning."""
    path = arm_path(out_dir, arm, seed)
    if path.is_file():
        return ArmResult(**json.loads(path.read_text()))
    run_dir = out_dir / "runs" / arm / f"seed_{seed}"
    start = time.perf_counter()
    result = train_fn(run_dir)
    if result.wall_seconds <= 0:
        result.wall_seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(result), indent=2) + "\n")
    return result


@dataclass
class Comparison:
    """An arm against the baseline over the seeds both have (paired by seed)."""

    arm: str
    baseline: str
    seeds: list[int]
    mean: float
    sd: float
    diff_mean: float  # arm - baseline (negative: the arm has lower loss)
    diff_se: float
    verdict: str  # "lower" / "higher" / "within noise" (|diff| < 2 SE) / "one seed"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.fmean(values), sd


def compare(results: Sequence[ArmResult], arm: str, baseline: str) -> Comparison:
    """Paired difference of `arm` to `baseline` over their common seeds, with its
    standard error; a difference under 2 standard errors is "within noise"."""
    by_seed = {(r.arm, r.seed): r.val_loss for r in results}
    seeds = sorted(s for (a, s) in by_seed if a == arm and (baseline, s) in by_seed)
    if not seeds:
        raise ValueError(f"no seed has results for both {arm!r} and {baseline!r}")
    diffs = [by_seed[arm, s] - by_seed[baseline, s] for s in seeds]
    mean, sd = mean_sd(by_seed[arm, s] for s in seeds)
    diff_mean, diff_sd = mean_sd(diffs)
    se = diff_sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    if len(diffs) < 2:
        verdict = "one seed"
    elif diff_mean == 0 or abs(diff_mean) < 2 * se:
        verdict = "within noise"
    else:
        verdict = "lower" if diff_mean < 0 else "higher"
    return Comparison(arm, baseline, seeds, mean, sd, diff_mean, se, verdict)


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def results_table(results: Sequence[ArmResult], baseline: str, arms: Sequence[str]) -> str:
    """A markdown table: per arm, val loss mean +- sd over seeds, the paired difference to
    the baseline +- its SE and the verdict, parameters, FLOPs per token, tokens."""
    lines = [
        f"| arm | seeds | val loss (mean +- sd) | vs {baseline} (diff +- SE) | verdict "
        "| params (total / active) | FLOPs/token | train tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rows = [r for r in results if r.arm == arm]
        if not rows:
            continue
        mean, sd = mean_sd(r.val_loss for r in rows)
        first = rows[0]
        if arm == baseline:
            versus, verdict = "(baseline)", ""
        else:
            c = compare(results, arm, baseline)
            versus, verdict = f"{c.diff_mean:+.4f} +- {_fmt(c.diff_se)}", c.verdict
        lines.append(
            f"| {arm} | {len(rows)} | {mean:.4f} +- {_fmt(sd)} | {versus} | {verdict} "
            f"| {_si(first.total_params)} / {_si(first.active_params)} "
            f"| {_si(first.flops_per_token)} | {_si(first.train_tokens)} |"
        )
    return "\n".join(lines)


def write_outputs(
    out_dir: Path, name: str, payload: dict[str, Any], markdown: str
) -> tuple[Path, Path]:
    """`results.json` (payload plus every arm result) and `results.md`, atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    atomic_write_text(json_path, json.dumps({"experiment": name, **payload}, indent=2) + "\n")
    atomic_write_text(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


def experiment_dir_name(name: str, scale: str) -> str:
    """The default directory name of `name` at `scale` (runs/reproduce/<this>): the full
    scale's is the bare name, other scales' carry it, so their arms never mix."""
    return name if scale == "full" else f"{name}-{scale}"


def claim_out_dir(out_dir: Path, name: str, scale: str) -> Path:
    """Mark `out_dir` as experiment `name` at `scale`, or refuse it when it holds another
    experiment or scale: stored arms are reused by name and seed alone, so a mixed-up
    directory would silently report another setting's results."""
    marker = out_dir / "experiment.json"
    want = {"experiment": name, "scale": scale}
    if marker.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} != want:
            raise ValueError(
                f"{out_dir} holds experiment {have.get('experiment')!r} at scale "
                f"{have.get('scale')!r}, not {name!r} at {scale!r}: its stored arms would be "
                "reused; pass another --out-dir (or remove that directory)"
            )
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(want) + "\n")
    return out_dir


def sibling_experiment_dir(out_dir: Path, name: str, scale: str) -> Path:
    """Where experiment `name` (whose models this one reuses) lives beside `out_dir`."""
    return claim_out_dir(out_dir.parent / experiment_dir_name(name, scale), name, scale)


def run_experiment(name: str, out_dir: str | Path, seeds: Sequence[int], scale: str) -> dict:
    """Run experiment `name` (a key of `modformer.experiments.EXPERIMENTS`)."""
    import importlib

    from modformer.experiments import EXPERIMENTS, SCALES

    if name not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {name!r}; choose one of {', '.join(sorted(EXPERIMENTS))}"
        )
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds}")
    module = importlib.import_module(EXPERIMENTS[name].module)
    return module.run(claim_out_dir(Path(out_dir), name, scale), seeds, scale)


# ---- data and measurement shared by the experiments ------------------------------------

BUILTIN_DATA = dict(vocab_size=4096, max_bytes_per_domain=1_500_000, seed=1337)


def builtin_data(data_dir: str | Path) -> Path:
    """The built-in corpus (python / prose / c domains, BPE 4096), prepared once into
    `data_dir` with the demo's settings and reused by every experiment."""
    from modformer.data.prepare import prepare

    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        prepare(data_dir, progress=False, **BUILTIN_DATA)
    return data_dir


def measure(
    model_dir: str | Path, data_dir: str | Path, block_size: int, batch_size: int = 16
) -> dict[str, float]:
    """A trained model's loss on the whole validation split (and per domain), its total
    and active parameters, and its inference FLOPs per token on validation windows."""
    from modformer.data.dataset import TokenDataset
    from modformer.eval.costs import inference_flops
    from modformer.eval.lm import evaluate_split
    from modformer.models.loading import load_model

    model = load_model(model_dir).eval()
    losses = evaluate_split(
        model, str(data_dir), "val", block_size=block_size, batch_size=batch_size, per_domain=True
    )
    batch = next(TokenDataset(data_dir, "val").iter_sequential(block_size, 4))
    flops = inference_flops(model, batch)
    return {
        "val_loss": losses["all"]["loss"],
        "val_tokens": losses["all"]["tokens"],
        "val_loss_per_domain": {k: v["loss"] for k, v in losses.items() if k != "all"},
        "total_params": model.num_parameters(),
        "active_params": flops.active_parameters,
        "flops_per_token": flops.per_token,
    }

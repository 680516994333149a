"""Experiment 6 (ModuleFormer Tables 2-3, in shape): a tiny ModuleFormer against dense models.

Arms (same data, same batches per seed, same steps and tokens, same recipe):

- ``moduleformer``: the tiny preset (4 layers, d=128; per layer 4 attention experts of 2
  heads, top-2, and 8 FFN experts of width 256, top-2; MI balance loss).
- ``gpt_equal_active`` (the baseline): the tiny GPT, whose 4 heads and FFN width 512 equal
  the ModuleFormer's *active* heads and FFN width: equal FLOPs per token (the routers
  aside), 45% of the parameters.
- ``dense_moduleformer``: the same architecture made dense as ONE expert of the TOTAL
  width (one attention expert of 8 heads, one FFN expert of width 2048, k=1, no balance
  loss): stick-breaking attention and all, every parameter active. It isolates sparsity
  from the architecture; +6% parameters (its shared W_k/W_v are 4x wider) and about 3x the
  FLOPs per token.
- ``gpt_equal_total``: a dense GPT with the ModuleFormer's total parameters (FFN width
  2136: within 0.1%).

Beside the losses, inference latency (one sequence) and throughput (a batch) of every
arm's first-seed model, measured in one process with interleaved timings on one thread and
reported as ratios to the baseline: the paper's "latency 50%, throughput 2x" claim. On a
shared, loaded CPU only the ratios mean anything (and only roughly).

The helpers below (data dir, scales, arm training, fast measurement, interleaved
timing) are shared with `moduleformer_balance`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modformer.experiments.common import (
    ArmResult,
    builtin_data,
    compare,
    results_table,
    run_arm,
    write_outputs,
)

NAME = "moduleformer-vs-dense"
DATA_ENV = "MODFORMER_REPRODUCE_DATA"
DEFAULT_DATA_DIR = Path("runs") / "reproduce" / "data"


@dataclass(frozen=True)
class Scale:
    steps: int
    batch_size: int
    block_size: int
    lr: float = 2e-3
    timing_rounds: int = 7  # interleaved timing rounds (median taken)
    latency_batch: int = 1
    throughput_batch: int = 16


# full: about 15 minutes for one experiment with 3 seeds on the loaded 2-core CPU.
SCALES: dict[str, Scale] = {
    "full": Scale(steps=100, batch_size=8, block_size=128),
    "quick": Scale(steps=3, batch_size=2, block_size=32, timing_rounds=2, throughput_batch=2),
}


def data_dir() -> Path:
    """The prepared data: $MODFORMER_REPRODUCE_DATA if set (used as is: the tests point it
    at a tiny prepared set), else the built-in corpus prepared once into
    runs/reproduce/data, shared by every experiment."""
    given = os.environ.get(DATA_ENV)
    if given:
        path = Path(given)
        if not (path / "meta.json").is_file():
            raise ValueError(
                f"{DATA_ENV}={given} is not a prepared data directory (no meta.json); "
                f"run `modformer prepare` into it or unset {DATA_ENV}"
            )
        return path
    return builtin_data(DEFAULT_DATA_DIR)


def scale_of(scale: str) -> Scale:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


def train_config(data: Path, run_dir: Path, seed: int, sc: Scale, steps: int, lr: float, model):
    """The demo's recipe (`modformer.experiments.demo._train_cfg`) on one thread, evaluation only at
    the end (the experiments measure the whole validation split themselves)."""
    from modformer.train.config import load_train_config

    return load_train_config(
        cli={
            "model": model,
            "data": {"dir": str(data), "block_size": sc.block_size},
            "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": max(steps // 20, 1)},
            "out_dir": str(run_dir),
            "seed": seed,
            "max_steps": steps,
            "batch_size": sc.batch_size,
            "eval_interval": 0,
            "eval_batches": 2,
            "log_interval": max(steps // 5, 1),
            "ckpt_interval": 0,
            "keep_last": 1,
            "progress": False,
            "threads": 1,
        }
    )


def measure_model(model, data: Path, block_size: int, batch_size: int = 16) -> dict[str, Any]:
    """Whole-validation-split loss (no per-domain pass: it would double the cost), total
    and active parameters and inference FLOPs per token on validation windows."""
    from modformer.data.dataset import TokenDataset
    from modformer.eval.costs import inference_flops
    from modformer.eval.lm import evaluate_split

    losses = evaluate_split(model, str(data), "val", block_size=block_size, batch_size=batch_size)
    batch = next(TokenDataset(data, "val").iter_sequential(block_size, 4))
    flops = inference_flops(model, batch)
    return {
        "val_loss": losses["all"]["loss"],
        "val_tokens": losses["all"]["tokens"],
        "total_params": model.num_parameters(),
        "active_params": flops.active_parameters,
        "flops_per_token": flops.per_token,
    }


def train_arm(
    out_dir: Path,
    arm: str,
    seed: int,
    data: Path,
    sc: Scale,
    model: dict[str, Any],
    steps: int | None = None,
    lr: float | None = None,
    after: Callable[[Any, Path], dict[str, Any]] | None = None,
) -> ArmResult:
    """Train (or load the stored result of) one arm at one seed with the real trainer.
    `after(model, run_dir)` adds measurements to the result's `extra`."""
    import torch

    from modformer.models.loading import load_model
    from modformer.train.trainer import train

    steps = sc.steps if steps is None else steps
    lr = sc.lr if lr is None else lr

    def fit(run_dir: Path) -> ArmResult:
        if run_dir.exists():  # a run killed half-way: start it again
            shutil.rmtree(run_dir)
        start = time.perf_counter()
        final = train(train_config(data, run_dir, seed, sc, steps, lr, model))
        seconds = time.perf_counter() - start
        torch.set_num_threads(1)
        trained = load_model(run_dir)
        m = measure_model(trained, data, sc.block_size)
        extra = {"val_tokens": m["val_tokens"], "lr": lr, "train_seconds": seconds}
        if after is not None:
            extra.update(after(trained, run_dir))
        return ArmResult(
            arm=arm,
            seed=seed,
            val_loss=m["val_loss"],
            total_params=m["total_params"],
            active_params=m["active_params"],
            flops_per_token=m["flops_per_token"],
            train_tokens=int(final["tokens_trained"]),
            steps=steps,
            wall_seconds=0.0,
            extra=extra,
        )

    return run_arm(out_dir, arm, seed, fit)


def interleaved_forward_times(
    models: dict[str, Any], inputs: Any, rounds: int
) -> dict[str, list[float]]:
    """Seconds of one no-grad forward of each model on `inputs`, the models taken in turn
    (A B C A B C ...) so a change of load on the shared machine hits all of them alike;
    one untimed warm-up call each."""
    import torch

    with torch.no_grad():
        for model in models.values():
            model(input_ids=inputs, use_cache=False)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=inputs, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return times


def speed_table(
    out_dir: Path, arms: Sequence[str], seed: int, data: Path, sc: Scale, baseline: str
) -> dict[str, dict[str, float]]:
    """Latency (a forward of `latency_batch` sequences) and throughput (tokens/s of a
    forward of `throughput_batch` sequences) of each arm's model at `seed`, on one
    thread, interleaved; ratios to `baseline` are medians of the per-round ratios."""
    import torch

    from modformer.data.dataset import TokenDataset
    from modformer.models.loading import load_model

    torch.set_num_threads(1)
    models = {arm: load_model(out_dir / "runs" / arm / f"seed_{seed}") for arm in arms}
    windows = TokenDataset(data, "val").iter_sequential(sc.block_size, sc.throughput_batch)
    batch = next(windows)
    latency = interleaved_forward_times(models, batch[: sc.latency_batch], sc.timing_rounds)
    bulk = interleaved_forward_times(models, batch, sc.timing_rounds)
    tokens = batch.numel()
    out = {}
    for arm in arms:
        out[arm] = {
            "latency_ms": 1000 * statistics.median(latency[arm]),
            "throughput_tokens_per_s": tokens / statistics.median(bulk[arm]),
            "latency_ratio": statistics.median(
                a / b for a, b in zip(latency[arm], latency[baseline])
            ),
            "throughput_ratio": statistics.median(b / a for a, b in zip(bulk[arm], bulk[baseline])),
        }
    return out


def speed_markdown(speed: dict[str, dict[str, float]], baseline: str, sc: Scale) -> str:
    lines = [
        f"Inference speed (first seed's models, 1 thread, {sc.timing_rounds} interleaved "
        f"rounds, medians; latency: a forward of {sc.latency_batch} x {sc.block_size} tokens; "
        f"throughput: a forward of {sc.throughput_batch} x {sc.block_size}; ratios to "
        f"{baseline}, per round). Measured on a shared, loaded CPU: only the ratios, roughly.",
        "",
        "| arm | latency ms | latency / baseline | throughput tok/s | throughput / baseline |",
        "|---|---|---|---|---|",
    ]
    for arm, s in speed.items():
        lines.append(
            f"| {arm} | {s['latency_ms']:.1f} | {s['latency_ratio']:.2f} "
            f"| {s['throughput_tokens_per_s']:.0f} | {s['throughput_ratio']:.2f} |"
        )
    return "\n".join(lines)


def comparisons_payload(results: Sequence[ArmResult], arms: Sequence[str], baseline: str):
    from dataclasses import asdict

    return {arm: asdict(compare(results, arm, baseline)) for arm in arms if arm != baseline}


# ---- experiment 6 -----------------------------------------------------------------------

BASELINE = "gpt_equal_active"
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "moduleformer": (
        "sparse: 4 x 2-head attention experts top-2, 8 x 256 FFN experts top-2, MI loss",
        dict(arch="moduleformer", preset="tiny"),
    ),
    BASELINE: ("dense GPT, equal active compute (FLOPs/token)", dict(arch="gpt", preset="tiny")),
    "dense_moduleformer": (
        "ModuleFormer as one expert of the total width (8 heads, FFN 2048, k=1): all active",
        dict(
            arch="moduleformer",
            preset="tiny",
            overrides=dict(
                n_att_experts=1,
                att_hidden=256,
                n_head=8,
                k_att=1,
                n_ffd_experts=1,
                ffd_hidden=2048,
                k_ffd=1,
                aux_loss_type="none",
            ),
        ),
    ),
    "gpt_equal_total": (
        "dense GPT, equal total parameters (FFN width 2136)",
        dict(arch="gpt", preset="tiny", overrides=dict(n_inner=2136)),
    ),
}
# One lever on one arm when the ModuleFormer does not beat the baseline: twice the peak
# learning rate (each expert sees about k/N of the tokens, so its updates are fewer);
# tokens and steps stay equal, so it is still the matched comparison.
LEVER_ARM = "moduleformer_2x_lr"


def run(out_dir: Path, seeds: Sequence[int], scale: str, lever: bool | None = None) -> dict:
    sc = scale_of(scale)
    data = data_dir()
    start = time.perf_counter()
    results = [
        train_arm(out_dir, arm, seed, data, sc, model)
        for seed in seeds
        for arm, (_, model) in ARMS.items()
    ]
    arms = list(ARMS)
    versus = compare(results, "moduleformer", BASELINE)
    if lever is None:  # the lever runs when the matched comparison is not a win
        lever = versus.verdict != "lower"
    if lever:
        model = ARMS["moduleformer"][1]
        results += [
            train_arm(out_dir, LEVER_ARM, seed, data, sc, model, lr=2 * sc.lr) for seed in seeds
        ]
        arms.append(LEVER_ARM)
    speed = speed_table(out_dir, list(ARMS), seeds[0], data, sc, BASELINE)
    wall = time.perf_counter() - start
    descriptions = {arm: d for arm, (d, _) in ARMS.items()}
    descriptions[LEVER_ARM] = f"the moduleformer arm at twice the peak lr ({2 * sc.lr}) (the lever)"
    table = results_table(results, BASELINE, arms)
    markdown = "\n".join(
        [
            f"# {NAME} (scale {scale}, seeds {list(seeds)}, {sc.steps} steps x "
            f"{sc.batch_size} x {sc.block_size} tokens, lr {sc.lr})",
            "",
            f"Baseline: {BASELINE} (equal FLOPs per token). Matched: equal tokens and steps "
            "for every arm; gpt_equal_total has equal total "
            "parameters; dense_moduleformer is the same architecture dense.",
            "",
            table,
            "",
            *[f"- {arm}: {d}" for arm, d in descriptions.items() if arm in arms],
            "",
            speed_markdown(speed, BASELINE, sc),
            "",
            f"Wall time of this invocation: {wall:.0f} s (stored arms are not retrained).",
        ]
    )
    payload = {
        "scale": scale,
        "seeds": list(seeds),
        "settings": sc.__dict__,
        "baseline": BASELINE,
        "arms": descriptions,
        "comparisons": comparisons_payload(results, arms, BASELINE),
        "speed": speed,
        "wall_seconds": wall,
        "results": [r.__dict__ for r in results],
    }
    write_outputs(out_dir, NAME, payload, markdown)
    return payload

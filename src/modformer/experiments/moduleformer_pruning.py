"""Experiment 10 (ModuleFormer Figs. 3-4, sec. 5.3): pruning curves on one domain.

Per seed, a tiny ModuleFormer is pretrained on the whole built-in corpus (python, prose,
c), then specialised to the ``python`` domain in both orders of sec. 5.3, and every
resulting model is scored on the whole python validation split against the fraction of
the pretrained model's parameters it keeps:

- ``fp_lc``: fine-tune on python with the load-concentration loss at the paper's weight
  (0.001), count expert usage on python, prune at each threshold (the paper's "f-p").
- ``fp_lc_x100`` / ``fp_lc_x1000``: the same at weights 0.1 and 1.0: the levers, since
  the paper's 0.001 is small beside the language-modelling loss at this scale (0.1 was
  tried first and barely moved the usage, so 1.0 followed).
- ``fp_noaux``: fine-tune without the loss, then prune (Fig. 4, "f-p_noaux").
- ``pf``: prune the pretrained model by its python usage at each threshold, then
  fine-tune each pruned model (the paper's "p-f").
- ``drop_top`` / ``drop_uniform``: the layer-wise baselines of Fig. 3 (Sajjad et al.):
  drop the top layers, or layers spread over the depth, of the model fine-tuned without
  the loss (``fp_noaux`` unpruned); no training after dropping, like f-p.
- ``drop_top_ft``: drop the top layers of the pretrained model, then fine-tune: the
  layer-drop counterpart of p-f (equal fine-tuning tokens).

Every fine-tuning has the same steps, batches and learning-rate schedule; the MI balance
loss of pretraining stays on. Usage is counted on the python *training* split (a fixed
number of batches), not on the windows that are scored. Each curve also has the
unpruned fine-tuned model at ratio 1 (for pf and the layer drops: fp_noaux's). Points of
different methods are compared at equal parameters by interpolating the other method's
curve at the point's ratio (`modformer.experiments.pruning_curves`), paired by seed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modformer.experiments.common import ArmResult, run_arm, write_outputs
from modformer.experiments.moduleformer_vs_dense import data_dir, train_config
from modformer.experiments.pruning_curves import (
    Matched,
    Point,
    curves_table,
    matched_comparison,
    matched_payload,
    matched_table,
    plot_curves,
)

NAME = "moduleformer-pruning"
DOMAIN = "python"
LOW_USAGE = 0.003  # the paper: "around half of the modules' frequency < 0.3% of the max"
FP_ARMS = {  # arm -> load-concentration weight while fine-tuning
    "fp_lc": 0.001,
    "fp_lc_x100": 0.1,
    "fp_lc_x1000": 1.0,
    "fp_noaux": 0.0,
}
DROP_ARMS = {"drop_top": "top", "drop_uniform": "uniform"}
UNPRUNED = "unpruned"


@dataclass(frozen=True)
class PruningScale:
    pretrain_steps: int
    finetune_steps: int
    batch_size: int
    block_size: int
    thresholds: tuple[float, ...]
    usage_batches: int  # batches of the domain's training split to count usage on
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    model: dict[str, Any] = field(default_factory=lambda: dict(arch="moduleformer", preset="tiny"))


SCALES: dict[str, PruningScale] = {
    "full": PruningScale(
        pretrain_steps=100,
        finetune_steps=40,
        batch_size=8,
        block_size=128,
        thresholds=(0.1, 0.3, 0.5, 0.7),
        usage_batches=40,
    ),
    "quick": PruningScale(
        pretrain_steps=2,
        finetune_steps=2,
        batch_size=2,
        block_size=32,
        thresholds=(0.3, 0.9),
        usage_batches=2,
        model=dict(
            arch="moduleformer",
            preset="tiny",
            overrides=dict(n_layer=2, n_embd=32, att_hidden=16, ffd_hidden=64, router_hidden=16),
        ),
    ),
}


def scale_of(scale: str) -> PruningScale:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


def check_domain(data: Path) -> None:
    from modformer.data.dataset import TokenDataset

    domains = TokenDataset(data, "val").domains
    if DOMAIN not in domains:
        raise ValueError(
            f"the pruning experiment fine-tunes on the {DOMAIN!r} domain, which {data} does "
            f"not have (domains: {', '.join(domains)}); prepare data with a {DOMAIN} domain"
        )


def finetune_settings(sc: PruningScale, seed: int) -> list[str]:
    """`--set` strings of every fine-tuning: the recipe of the pretraining on one thread,
    fewer steps at a lower peak learning rate."""
    steps, lr = sc.finetune_steps, sc.finetune_lr
    return [
        f"seed={seed}",
        f"max_steps={steps}",
        f"batch_size={sc.batch_size}",
        f"data.block_size={sc.block_size}",
        f"optim.lr={lr}",
        f"optim.min_lr={lr / 10}",
        f"optim.warmup_steps={max(steps // 20, 1)}",
        "eval_interval=0",
        "eval_batches=2",
        f"log_interval={max(steps // 5, 1)}",
        "ckpt_interval=0",
        "keep_last=1",
        "progress=false",
        "threads=1",
    ]


def score(model, data: Path, sc: PruningScale, label: str, total_before: int) -> Point:
    """The model's loss on the whole validation split of DOMAIN, its parameters (and their
    ratio to the pretrained model's) and inference FLOPs per token there."""
    import torch

    from modformer.data.dataset import TokenDataset
    from modformer.eval.costs import inference_flops
    from modformer.eval.lm import evaluate_split

    torch.set_num_threads(1)
    model = model.eval()
    losses = evaluate_split(
        model, str(data), "val", block_size=sc.block_size, batch_size=16, domains=[DOMAIN]
    )
    batch = next(TokenDataset(data, "val", domains=[DOMAIN]).iter_sequential(sc.block_size, 4))
    flops = inference_flops(model, batch)
    total = model.num_parameters()
    return Point(
        label=label,
        params_ratio=total / total_before,
        val_loss=losses["all"]["loss"],
        total_params=total,
        active_params=flops.active_parameters,
        flops_per_token=flops.per_token,
    )


def _result(arm: str, seed: int, unpruned: Point, points: list[Point], tokens: int, steps: int,
            **extra: Any) -> ArmResult:  # fmt: skip
    return ArmResult(
        arm=arm,
        seed=seed,
        val_loss=unpruned.val_loss,
        total_params=unpruned.total_params,
        active_params=unpruned.active_params,
        flops_per_token=unpruned.flops_per_token,
        train_tokens=tokens,
        steps=steps,
        wall_seconds=0.0,
        extra={"points": [asdict(p) for p in points], **extra},
    )


def _fresh(run_dir: Path) -> Path:
    if run_dir.exists():  # a stage killed half-way: start it again
        shutil.rmtree(run_dir)
    return run_dir


def _load(path: Path):
    from modformer.models.loading import load_model

    return load_model(path)


def pretrain(out: Path, seed: int, data: Path, sc: PruningScale) -> ArmResult:
    from modformer.train.trainer import train

    def fit(run_dir: Path) -> ArmResult:
        _fresh(run_dir)
        final = train(train_config(data, run_dir, seed, sc, sc.pretrain_steps, sc.lr, sc.model))
        model = _load(run_dir)
        point = score(model, data, sc, UNPRUNED, model.num_parameters())
        return _result("pretrain", seed, point, [], int(final["tokens_trained"]), sc.pretrain_steps)

    return run_arm(out, "pretrain", seed, fit)


def model_dir_of(out: Path, arm: str, seed: int) -> Path:
    """Where a stage keeps its unpruned model."""
    run = out / "runs" / arm / f"seed_{seed}"
    return run / "model" if arm == "pretrain" else run / "finetuned" / "model"


def finetune_then_prune_arm(
    out: Path, arm: str, seed: int, data: Path, sc: PruningScale, base: ArmResult
) -> ArmResult:
    from modformer.experiments.prune_workflows import finetune_then_prune

    weight = FP_ARMS[arm]

    def fit(run_dir: Path) -> ArmResult:
        result = finetune_then_prune(
            model_dir_of(out, "pretrain", seed),
            data,
            sc.thresholds,
            _fresh(run_dir),
            load_concentration_weight=weight,
            train_settings=finetune_settings(sc, seed),
            split="train",
            block_size=sc.block_size,
            max_batches=sc.usage_batches,
            domains=[DOMAIN],
        )
        total = base.total_params
        unpruned = score(_load(run_dir / "finetuned"), data, sc, UNPRUNED, total)
        points = [
            score(_load(run_dir / f"pruned_tau{tau:g}"), data, sc, f"tau{tau:g}", total)
            for tau in sc.thresholds
        ]
        frequencies = result["usage"].module_frequencies("max")
        experts = sum(f.numel() for f in frequencies.values())
        low = sum(int((f < LOW_USAGE).sum()) for f in frequencies.values())
        return _result(
            arm,
            seed,
            unpruned,
            [unpruned, *points],
            int(result["train"]["tokens_trained"]),
            sc.finetune_steps,
            load_concentration_weight=weight,
            low_usage_experts=low,
            experts=experts,
        )

    return run_arm(out, arm, seed, fit)


def prune_then_finetune_arm(
    out: Path, seed: int, data: Path, sc: PruningScale, base: ArmResult, unpruned: ArmResult
) -> ArmResult:
    from modformer.experiments.prune_workflows import prune_then_finetune, usage_on_domains

    pretrained = model_dir_of(out, "pretrain", seed)

    def fit(run_dir: Path) -> ArmResult:
        _fresh(run_dir)
        usage = usage_on_domains(
            pretrained, data, "train", sc.block_size, sc.usage_batches, [DOMAIN]
        )
        points, tokens = [], 0
        for tau in sc.thresholds:
            result = prune_then_finetune(
                pretrained,
                data,
                tau,
                run_dir / f"tau{tau:g}",
                train_settings=finetune_settings(sc, seed),
                block_size=sc.block_size,
                domains=[DOMAIN],
                usage=usage,
            )
            model = _load(run_dir / f"tau{tau:g}" / "finetuned")
            points.append(score(model, data, sc, f"tau{tau:g}", base.total_params))
            tokens = int(result["train"]["tokens_trained"])
        ref = Point(**unpruned.extra["points"][0])  # fp_noaux unpruned: p-f at tau 0
        return _result("pf", seed, ref, [ref, *points], tokens, sc.finetune_steps)

    return run_arm(out, "pf", seed, fit)


def layer_drop_arm(
    out: Path, arm: str, seed: int, data: Path, sc: PruningScale, base: ArmResult,
    unpruned: ArmResult,
) -> ArmResult:  # fmt: skip
    """Drop layers of fp_noaux's fine-tuned model (no training after)."""
    from modformer.surgery.layer_drop import drop_layers

    def fit(run_dir: Path) -> ArmResult:
        model = _load(model_dir_of(out, "fp_noaux", seed))
        points = []
        for n in range(model.config.num_hidden_layers - 1, 0, -1):
            dropped, _ = drop_layers(model, n, DROP_ARMS[arm])
            points.append(score(dropped, data, sc, f"layers{n}", base.total_params))
        ref = Point(**unpruned.extra["points"][0])
        return _result(arm, seed, ref, [ref, *points], 0, 0)

    return run_arm(out, arm, seed, fit)


def drop_then_finetune_arm(
    out: Path, seed: int, data: Path, sc: PruningScale, base: ArmResult, unpruned: ArmResult
) -> ArmResult:
    """Drop the top layers of the pretrained model, then fine-tune as p-f does."""
    from modformer.experiments.prune_workflows import train_from
    from modformer.surgery.extend import save_model_with_tokenizer
    from modformer.surgery.layer_drop import drop_layers

    pretrained = model_dir_of(out, "pretrain", seed)

    def fit(run_dir: Path) -> ArmResult:
        model = _load(pretrained)
        _fresh(run_dir)
        points, tokens = [], 0
        for n in range(model.config.num_hidden_layers - 1, 0, -1):
            dropped, _ = drop_layers(model, n, "top")
            start = save_model_with_tokenizer(dropped, run_dir / f"layers{n}" / "start", pretrained)
            final = train_from(
                Path(start), data, run_dir / f"layers{n}" / "finetuned",
                finetune_settings(sc, seed), [DOMAIN],
            )  # fmt: skip
            trained = _load(run_dir / f"layers{n}" / "finetuned")
            points.append(score(trained, data, sc, f"layers{n}", base.total_params))
            tokens = int(final["tokens_trained"])
        ref = Point(**unpruned.extra["points"][0])
        return _result("drop_top_ft", seed, ref, [ref, *points], tokens, sc.finetune_steps)

    return run_arm(out, "drop_top_ft", seed, fit)


# ---- the experiment ---------------------------------------------------------------------

LC_ARMS = {arm: w for arm, w in FP_ARMS.items() if w > 0}
# (question, method, baseline): each point of `method` against `baseline` at equal params.
QUESTIONS: list[tuple[str, str, str]] = [
    *[
        (f"{arm} vs {drop}: expert pruning vs layer dropping, no training after", arm, drop)
        for arm in FP_ARMS
        for drop in DROP_ARMS
    ],
    ("pf vs drop_top_ft: expert pruning vs layer dropping, fine-tuned after", "pf", "drop_top_ft"),
    *[
        (
            f"{arm} vs pf: finetune-then-prune (load-concentration weight {w:g}) vs "
            "prune-then-finetune",
            arm,
            "pf",
        )
        for arm, w in LC_ARMS.items()
    ],
    *[
        (f"{arm} vs fp_noaux: load concentration (weight {w:g}) vs none (Fig. 4)", arm, "fp_noaux")
        for arm, w in LC_ARMS.items()
    ],
]
METHODS = [*FP_ARMS, "pf", *DROP_ARMS, "drop_top_ft"]


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    sc = scale_of(scale)
    data = data_dir()
    check_domain(data)
    start = time.perf_counter()
    results: list[ArmResult] = []
    for seed in seeds:
        base = pretrain(out_dir, seed, data, sc)
        fp = {arm: finetune_then_prune_arm(out_dir, arm, seed, data, sc, base) for arm in FP_ARMS}
        results += [base, *fp.values()]
        results.append(prune_then_finetune_arm(out_dir, seed, data, sc, base, fp["fp_noaux"]))
        for arm in DROP_ARMS:
            results.append(layer_drop_arm(out_dir, arm, seed, data, sc, base, fp["fp_noaux"]))
        results.append(drop_then_finetune_arm(out_dir, seed, data, sc, base, fp["fp_noaux"]))
    wall = time.perf_counter() - start
    curves = {
        (r.arm, r.seed): [Point(**p) for p in r.extra["points"]]
        for r in results
        if r.arm != "pretrain"
    }
    matched: dict[str, list[Matched]] = {}
    for question, arm, baseline in QUESTIONS:
        labels = [f"tau{tau:g}" for tau in sc.thresholds]
        matched[question] = [matched_comparison(curves, arm, label, baseline) for label in labels]
    figure = plot_curves(
        curves, METHODS, out_dir / "pruning_curves.png",
        f"{NAME}: {DOMAIN} val loss vs kept parameters ({len(seeds)} seeds)",
    )  # fmt: skip
    markdown = _markdown(results, curves, matched, sc, scale, seeds, wall, figure)
    payload = {
        "scale": scale,
        "seeds": list(seeds),
        "domain": DOMAIN,
        "settings": asdict(sc),
        "methods": METHODS,
        "matched": {q: matched_payload(rows) for q, rows in matched.items()},
        "figure": None if figure is None else figure.name,
        "wall_seconds": wall,
        "results": [asdict(r) for r in results],
    }
    write_outputs(out_dir, NAME, payload, markdown)
    return payload


def _markdown(results, curves, matched, sc, scale, seeds, wall, figure) -> str:
    import statistics

    pretrained = [r for r in results if r.arm == "pretrain"]
    lines = [
        f"# {NAME} (scale {scale}, seeds {list(seeds)}; pretraining {sc.pretrain_steps} steps "
        f"on all domains, every fine-tuning {sc.finetune_steps} steps on {DOMAIN}, "
        f"{sc.batch_size} x {sc.block_size} tokens, peak lr {sc.lr} / {sc.finetune_lr})",
        "",
        f"Loss: the whole {DOMAIN} validation split. Kept params: ratio to the pretrained "
        f"model ({pretrained[0].total_params:,} parameters). Pretrained model on {DOMAIN}: "
        f"{statistics.fmean(r.val_loss for r in pretrained):.4f} (mean over seeds).",
        "",
        "## Curves (mean +- sd over seeds)",
        "",
        curves_table(curves, METHODS),
        "",
        "## At equal parameters (the other method interpolated at the point's ratio, "
        "paired by seed; negative: the method has the lower loss)",
    ]
    for question, rows in matched.items():
        lines += ["", f"### {question}", "", matched_table(rows)]
    lines += [
        "",
        f"## Load concentration: experts under {LOW_USAGE:.1%} of their layer's most used "
        f"(on {DOMAIN}, after fine-tuning)",
        "",
        "| method | weight | low-usage experts per seed |",
        "|---|---|---|",
    ]
    for arm, weight in FP_ARMS.items():
        rows = [r for r in results if r.arm == arm]
        counts = ", ".join(f"{r.extra['low_usage_experts']}/{r.extra['experts']}" for r in rows)
        lines.append(f"| {arm} | {weight:g} | {counts} |")
    if figure is not None:
        lines += ["", f"Figure: {figure.name}"]
    lines += ["", f"Wall time of this invocation: {wall:.0f} s (stored arms are not retrained)."]
    return "\n".join(lines)

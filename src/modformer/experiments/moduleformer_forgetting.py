"""Experiment 9 (ModuleFormer Tables 5-6, sec. 5.2): forgetting, with seeds and at matched
plasticity.

Per seed, on the built-in corpus: a tiny ModuleFormer and a tiny GPT (equal active
compute) are pretrained on the old domains (prose, c), then trained on the new one
(python) only, the lifelong setting of Table 6 (`modformer.experiments.forgetting`):

- ``moduleformer_full`` (the baseline): every parameter trained; evaluated every
  `trajectory_interval` steps along the way (its trajectory);
- ``insert_regW``: 2 experts inserted per layer, only they and their router rows trained,
  routing regulariser weight W (eq. 10), for each W of the scale;
- ``gpt_full``: the dense GPT, every parameter trained, with its trajectory too;
- ``moduleformer_full_early`` (first seed only): the baseline's run again, evaluated
  densely over its first steps (see EARLY).

Losses on the whole validation split of each domain. Forgetting is the change of the
old-domain loss, learning the change of the new-domain loss, each paired by seed with
the baseline. Because insertion learns the new domain less, "insertion forgets less" is
judged at equal plasticity: each arm's forgetting against the full fine-tuning
trajectory's forgetting at the arm's learning (`matched_difference`). The pretraining
runs are arms of their own (``pretrain_moduleformer``, ``pretrain_gpt``), so a killed run
resumes after them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from modformer.experiments.common import (
    ArmResult,
    _fmt,
    _si,
    compare,
    mean_sd,
    run_arm,
    write_outputs,
)
from modformer.experiments.forgetting import (
    ForgettingSettings,
    continual,
    insert_experts,
    old_loss_at_new_loss,
    pretrain,
)
from modformer.experiments.moduleformer_vs_dense import data_dir

NAME = "moduleformer-forgetting"
BASELINE = "moduleformer_full"
# The baseline's training once more on the first seed (the same seed and batches, so the
# same run), evaluated every `early_interval` steps up to `early_until`: the insertion
# arms match full fine-tuning within its first trajectory interval, and this checks the
# linear interpolation there.
EARLY = "moduleformer_full_early"


@dataclass(frozen=True)
class Scale:
    pretrain_steps: int
    steps: int
    batch_size: int
    block_size: int
    trajectory_interval: int
    early_interval: int  # the early arm's trajectory: every this many steps ...
    early_until: int  # ... up to this step
    reg_weights: tuple[float, ...] = (0.0, 1.0)
    lr: float = 2e-3


# full: 3 seeds took 1,627 s of CPU time (about 27 minutes on one idle core; 64 minutes
# wall on the loaded 2-core machine), docs/results.md.
SCALES: dict[str, Scale] = {
    "full": Scale(
        pretrain_steps=200,
        steps=120,
        batch_size=16,
        block_size=64,
        trajectory_interval=8,
        early_interval=2,
        early_until=16,
    ),
    "quick": Scale(
        pretrain_steps=3,
        steps=4,
        batch_size=2,
        block_size=16,
        trajectory_interval=2,
        early_interval=1,
        early_until=2,
    ),
}


def scale_of(scale: str) -> Scale:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


def insert_arm(weight: float) -> str:
    return f"insert_reg{weight:g}"


def settings_for(sc: Scale, data: Path, seed: int) -> ForgettingSettings:
    return ForgettingSettings(
        data_dir=str(data),
        pretrain_steps=sc.pretrain_steps,
        steps=sc.steps,
        routing_reg_weights=list(sc.reg_weights),
        batch_size=sc.batch_size,
        block_size=sc.block_size,
        lr=sc.lr,
        eval_batches=0,  # the whole validation split of each domain
        trajectory_interval=sc.trajectory_interval,
        seed=seed,
        threads=1,
    )


def _costs(model_dir: Path, s: ForgettingSettings) -> dict[str, float]:
    """Total and active parameters and inference FLOPs per token on validation windows."""
    from modformer.data.dataset import TokenDataset
    from modformer.eval.costs import inference_flops
    from modformer.surgery.extend import load_model_dir

    model = load_model_dir(model_dir)
    batch = next(TokenDataset(s.data_dir, "val").iter_sequential(s.block_size, 4))
    flops = inference_flops(model, batch)
    return {
        "total_params": model.num_parameters(),
        "active_params": flops.active_parameters,
        "flops_per_token": flops.per_token,
    }


def _arms(
    out_dir: Path, seed: int, s: ForgettingSettings, early: ForgettingSettings | None = None
) -> list[ArmResult]:
    """Every arm of one seed (stored ones are read back, not retrained); with `early`, also
    the EARLY arm under those settings."""
    runs = out_dir / "runs"
    results: list[ArmResult] = []

    def pretrained(arch: str) -> ArmResult:
        def fit(run_dir: Path) -> ArmResult:
            ev = pretrain(s, run_dir, arch)
            return ArmResult(
                arm=f"pretrain_{arch}",
                seed=seed,
                val_loss=ev["all"],
                **_costs(run_dir / "model", s),
                train_tokens=s.pretrain_steps * s.batch_size * s.block_size,
                steps=s.pretrain_steps,
                wall_seconds=0.0,
                extra={"eval": ev},
            )

        result = run_arm(out_dir, f"pretrain_{arch}", seed, fit)
        results.append(result)
        return result

    def continued(arm: str, pre: ArmResult, start_fn, with_trajectory: bool, settings=s) -> None:
        pre_dir = runs / pre.arm / f"seed_{seed}" / "model"

        def fit(run_dir: Path) -> ArmResult:
            if not (pre_dir / "config.json").is_file():
                raise ValueError(
                    f"the pretrained model of seed {seed} is missing ({pre_dir}) although its "
                    f"result is stored; delete {out_dir / 'arms' / pre.arm} to pretrain again"
                )
            start, extra = start_fn(pre_dir, run_dir)
            row = continual(settings, arm, start, run_dir, pre.extra["eval"], with_trajectory)
            return ArmResult(
                arm=arm,
                seed=seed,
                val_loss=row["after"]["all"],
                **_costs(run_dir / "model", s),
                train_tokens=row["train_tokens"],
                steps=s.steps,
                wall_seconds=0.0,
                extra={**row, **extra},
            )

        results.append(run_arm(out_dir, arm, seed, fit))

    def as_is(pre_dir: Path, run_dir: Path) -> tuple[Path, dict]:
        return pre_dir, {}

    def inserted(weight: float):
        def start_fn(pre_dir: Path, run_dir: Path) -> tuple[Path, dict]:
            start = run_dir.parent / f"extended_seed_{seed}"
            return start, {"at_insertion": insert_experts(s, pre_dir, weight, start)}

        return start_fn

    mf = pretrained("moduleformer")
    continued(BASELINE, mf, as_is, with_trajectory=True)
    if early is not None:  # the baseline's training again, with a denser early trajectory
        continued(EARLY, mf, as_is, with_trajectory=True, settings=early)
    for weight in s.routing_reg_weights:
        continued(insert_arm(weight), mf, inserted(weight), with_trajectory=False)
    gpt = pretrained("gpt")
    continued("gpt_full", gpt, as_is, with_trajectory=True)
    return results


# ---- matched plasticity ----------------------------------------------------------------


def _changes(points: Sequence[dict], before: dict) -> list[dict]:
    return [
        {"step": p["step"], "old": p["old"] - before["old"], "new": p["new"] - before["new"]}
        for p in points
    ]


def matched_difference(arm: ArmResult, reference: ArmResult) -> dict[str, Any] | None:
    """`arm`'s forgetting minus `reference`'s at equal learning of the new domain (changes
    of the losses from each one's own pretrained model, so models pretrained apart compare
    too). The reference's trajectory is interpolated at the arm's learning
    (`old_loss_at_new_loss`); when the reference never learns that much but the arm has a
    trajectory, the arm's is interpolated at the reference's final learning instead. None
    when neither applies."""
    a, r = arm.extra, reference.extra
    a_old = a["after"]["old"] - a["before"]["old"]
    a_new = a["after"]["new"] - a["before"]["new"]
    r_old = r["after"]["old"] - r["before"]["old"]
    r_new = r["after"]["new"] - r["before"]["new"]
    at = old_loss_at_new_loss(_changes(r["trajectory"], r["before"]), a_new)
    if at is not None:
        return {"arm": a_old, "reference": at["old"], "learning": a_new,
                "at": f"{reference.arm} step {at['step']:.1f}"}  # fmt: skip
    if "trajectory" in a:
        at = old_loss_at_new_loss(_changes(a["trajectory"], a["before"]), r_new)
        if at is not None:
            return {"arm": at["old"], "reference": r_old, "learning": r_new,
                    "at": f"{arm.arm} step {at['step']:.1f}"}  # fmt: skip
    return None


def _metric(results: Sequence[ArmResult], key: str) -> list[ArmResult]:
    """The continual arms with `val_loss` replaced by the change of the `key` loss."""
    return [
        replace(r, val_loss=r.extra["after"][key] - r.extra["before"][key])
        for r in results
        if "after" in r.extra
    ]


def matched_results(results: Sequence[ArmResult], arm: str, reference: str):
    """Paired per seed: `arm`'s forgetting (val_loss) and the reference's at equal
    learning (as arm "REFERENCE@ARM"), for the seeds where a match exists; and the
    per-seed details."""
    by = {(r.arm, r.seed): r for r in results}
    paired, details = [], []
    for (name, seed), r in sorted(by.items()):
        if name != arm or (reference, seed) not in by:
            continue
        m = matched_difference(r, by[reference, seed])
        details.append({"seed": seed, **(m or {"unmatched": True})})
        if m is not None:
            paired.append(replace(r, val_loss=m["arm"]))
            paired.append(replace(r, arm=f"{reference}@{arm}", val_loss=m["reference"]))
    return paired, details


# ---- outputs ---------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.4f} +- {_fmt(sd)}"


def _levels_table(results: Sequence[ArmResult], arms: Sequence[str]) -> str:
    lines = [
        "| arm | seeds | old before | old after | new before | new after "
        "| params (total / trainable / active) | FLOPs/token | train tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rows = [r for r in results if r.arm == arm]
        if not rows:
            continue
        ev = [r.extra.get("after", r.extra.get("eval")) for r in rows]
        if "before" in rows[0].extra:
            old_b = _ms([r.extra["before"]["old"] for r in rows])
            new_b = _ms([r.extra["before"]["new"] for r in rows])
        else:
            old_b = new_b = "-"
        trainable = rows[0].extra.get("trainable_params", rows[0].total_params)
        lines.append(
            f"| {arm} | {len(rows)} | {old_b} | {_ms([e['old'] for e in ev])} | {new_b} "
            f"| {_ms([e['new'] for e in ev])} | {_si(rows[0].total_params)} / {_si(trainable)} "
            f"/ {_si(rows[0].active_params)} | {_si(rows[0].flops_per_token)} "
            f"| {_si(rows[0].train_tokens)} |"
        )
    return "\n".join(lines)


def _change_table(results: Sequence[ArmResult], arms: Sequence[str]) -> tuple[str, dict]:
    forgetting, learning = _metric(results, "old"), _metric(results, "new")
    lines = [
        f"| arm | forgetting: old change (mean +- sd) | vs {BASELINE} (diff +- SE) | verdict "
        f"| learning: new change (mean +- sd) | vs {BASELINE} (diff +- SE) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    payload: dict[str, Any] = {}
    for arm in arms:
        cells = []
        for key, derived in (("forgetting", forgetting), ("learning", learning)):
            values = [r.val_loss for r in derived if r.arm == arm]
            if arm == BASELINE:
                cells += [_ms(values), "(baseline)", ""]
                continue
            c = compare(derived, arm, BASELINE)
            payload.setdefault(arm, {})[key] = asdict(c)
            cells += [_ms(values), f"{c.diff_mean:+.4f} +- {_fmt(c.diff_se)}", c.verdict]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines), payload


def _matched_table(results: Sequence[ArmResult], pairs: Sequence[tuple[str, str]]):
    lines = [
        "| arm | vs (at equal learning) | seeds matched | learning (new change) "
        "| arm's forgetting | reference's forgetting there | diff +- SE | verdict "
        "| matched at (per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    payload: dict[str, Any] = {}
    for arm, reference in pairs:
        paired, details = matched_results(results, arm, reference)
        matched = [d for d in details if "unmatched" not in d]
        entry: dict[str, Any] = {"details": details}
        if len(matched) == 0:
            lines.append(f"| {arm} | {reference} | 0 of {len(details)} | - | - | - | - | - | - |")
        else:
            c = compare(paired, arm, f"{reference}@{arm}")
            entry["comparison"] = asdict(c)
            refs = [d["reference"] for d in matched]
            lines.append(
                f"| {arm} | {reference} | {len(matched)} of {len(details)} "
                f"| {_ms([d['learning'] for d in matched])} | {_ms([d['arm'] for d in matched])} "
                f"| {_ms(refs)} | {c.diff_mean:+.4f} +- {_fmt(c.diff_se)} | {c.verdict} "
                f"| {'; '.join(d['at'] for d in matched)} |"
            )
        payload[f"{arm} vs {reference}"] = entry
    return "\n".join(lines), payload


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    sc = scale_of(scale)
    data = data_dir()
    start = time.perf_counter()
    settings = {seed: settings_for(sc, data, seed) for seed in seeds}
    for s in settings.values():
        s.check()
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer's setting: evaluation runs under it too
    early = replace(
        settings[seeds[0]],
        trajectory_interval=sc.early_interval,
        trajectory_until=sc.early_until,
    )
    try:
        results = [
            r
            for seed in seeds
            for r in _arms(out_dir, seed, settings[seed], early if seed == seeds[0] else None)
        ]
    finally:
        torch.set_num_threads(previous_threads)
    wall = time.perf_counter() - start
    inserts = [insert_arm(w) for w in sc.reg_weights]
    continual_arms = [BASELINE, *inserts, "gpt_full"]
    pairs = [
        *((a, BASELINE) for a in inserts),
        ("gpt_full", BASELINE),
        *((a, EARLY) for a in inserts),
    ]
    changes, change_payload = _change_table(results, continual_arms)
    matched, matched_payload = _matched_table(results, pairs)
    s0 = settings[seeds[0]]
    markdown = "\n".join(
        [
            f"# {NAME} (scale {scale}, seeds {list(seeds)})",
            "",
            f"Pretraining {sc.pretrain_steps} steps on {'+'.join(s0.old_domains)}, then "
            f"{sc.steps} steps on {s0.new_domain} only (lifelong), {sc.batch_size} x "
            f"{sc.block_size} tokens per step, peak lr {sc.lr}. Losses in nats per token on the "
            "whole validation split of each domain (old: token-weighted over the old domains). "
            "Equal steps, batches and tokens for every arm of a seed; the ModuleFormer and the "
            "GPT have equal active compute, not equal parameters.",
            "",
            "Losses (mean +- sd over seeds; the pretrain rows are the 'freeze all' models):",
            "",
            _levels_table(
                results, ["pretrain_moduleformer", *continual_arms[:-1], "pretrain_gpt", "gpt_full"]
            ),  # fmt: skip
            "",
            "Forgetting (old-domain loss change, positive = forgot) and learning (new-domain "
            "loss change, negative = learned), paired by seed with the baseline:",
            "",
            changes,
            "",
            "Matched plasticity: each arm's forgetting against the reference's forgetting at "
            f"the same learning, interpolated on the reference's trajectory (every "
            f"{sc.trajectory_interval} steps; docs/forgetting.md states the rule):",
            "",
            matched,
            "",
            f"The rows against {EARLY} use the baseline's training run again on seed "
            f"{seeds[0]} (the same run: same seed and batches), evaluated every "
            f"{sc.early_interval} steps up to step {sc.early_until}: they check the linear "
            "interpolation inside the baseline's first trajectory interval.",
            "",
            f"Wall time of this invocation: {wall:.0f} s (stored arms are not retrained).",
        ]
    )
    payload = {
        "scale": scale,
        "seeds": list(seeds),
        "settings": asdict(sc),
        "baseline": BASELINE,
        "changes": change_payload,
        "matched_plasticity": matched_payload,
        "wall_seconds": wall,
        "results": [asdict(r) for r in results],
    }
    write_outputs(out_dir, NAME, payload, markdown)
    return payload

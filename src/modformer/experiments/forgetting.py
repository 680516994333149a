"""Catastrophic forgetting at CPU scale: the shape of ModuleFormer Tables 5-6 (sec. 5.2).

The paper pretrains on English, then continues training on a new language and measures
the old and the new ability. Here the built-in corpus plays both parts: pretraining sees
the old domains (default: ``prose`` and ``c``), continual training sees only the new one
(default: ``python``; the "lifelong" setting of Table 6, no old data). Every method starts
from the same pretrained weights and trains the same steps on the same batches:

- ``moduleformer full``: the ModuleFormer, every parameter trained;
- ``moduleformer insert reg=W``: ``new_experts`` experts inserted per layer (sec. 4.3),
  only they and their router rows A' trained, routing regulariser weight W (eq. 10), no
  load-balancing loss (the paper's "Partial" router, Table 9);
- ``gpt full``: a dense GPT of equal active compute (the presets are sized so: the tiny
  ModuleFormer runs 2 of 4 two-head attention experts and 2 of 8 FFN experts of width 256
  per token, as many heads and as wide an FFN as the tiny GPT), pretrained the same steps.

For each: validation loss on the old domains (token-weighted over them) and on the new one,
before and after continual training; "before" is the "freeze all" row of the paper. Full
fine-tuning is also evaluated along its trajectory (every `trajectory_interval` steps), so
that an insertion run can be compared with full fine-tuning at equal learning of the new
domain (`old_loss_at_new_loss`: docs/forgetting.md states the rule).

This module is the machinery shared by `modformer forgetting` (one seed,
`run_forgetting_experiment`) and `modformer reproduce moduleformer-forgetting` (seeds,
`modformer.experiments.moduleformer_forgetting`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from modformer.defaults import DEFAULT_NEW_DOMAIN, DEFAULT_OLD_DOMAINS, DEFAULT_REG_WEIGHTS
from modformer.surgery.extend import (
    SurgeryError,
    apply_trainable_scope,
    extend_model,
    is_inserted_parameter,
    load_model_dir,
    save_model_with_tokenizer,
)

log = logging.getLogger("modformer.forgetting")


@dataclass(frozen=True)
class ForgettingSettings:
    """Everything one run of the experiment depends on (written into its results)."""

    data_dir: str
    old_domains: list[str] = field(default_factory=lambda: list(DEFAULT_OLD_DOMAINS))
    new_domain: str = DEFAULT_NEW_DOMAIN
    preset: str = "tiny"
    pretrain_steps: int = 300
    steps: int = 150
    new_experts: int = 2
    routing_reg_weights: list[float] = field(default_factory=lambda: list(DEFAULT_REG_WEIGHTS))
    batch_size: int = 16
    block_size: int = 64
    lr: float = 2e-3
    eval_batches: int = 4  # val batches of 8 windows per domain; 0: the whole split
    trajectory_interval: int = 15  # full fine-tuning evaluated every N steps; 0: not
    trajectory_until: int = 0  # ... up to this step only (then at the end); 0: all the way
    seed: int = 1337
    threads: int = 1
    progress: bool = False

    def check(self) -> None:
        for name in ("pretrain_steps", "steps", "new_experts", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise SurgeryError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batches", "trajectory_interval", "trajectory_until"):
            if getattr(self, name) < 0:
                value = getattr(self, name)
                raise SurgeryError(f"{name} must be >= 0 (0: {_ZERO[name]}), got {value}")
        if not self.routing_reg_weights or any(not w >= 0 for w in self.routing_reg_weights):
            raise SurgeryError(
                "routing_reg_weights must be one or more weights >= 0, "
                f"got {self.routing_reg_weights}"
            )
        if self.threads < 0:
            raise SurgeryError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not self.lr > 0:
            raise SurgeryError(f"lr must be > 0, got {self.lr}")
        check_domains(Path(self.data_dir), self.old_domains, self.new_domain)


_ZERO = {
    "eval_batches": "the whole split",
    "trajectory_interval": "no trajectory",
    "trajectory_until": "the whole run",
}


def prepare_builtin_data(data_dir: Path, max_bytes_per_domain: int, vocab_size: int, seed: int):
    from modformer.data.prepare import prepare

    if (data_dir / "meta.json").is_file():
        log.info("reusing the prepared data in %s", data_dir)
        return
    log.info("preparing the built-in corpus into %s", data_dir)
    prepare(
        data_dir,
        vocab_size=vocab_size,
        max_bytes_per_domain=max_bytes_per_domain,
        seed=seed,
        progress=False,
    )


def check_domains(data_dir: Path, old_domains: Sequence[str], new_domain: str) -> None:
    from modformer.data.dataset import TokenDataset

    available = set(TokenDataset(data_dir, "val").domains)
    wanted = [*old_domains, new_domain]
    missing = [d for d in wanted if d not in available]
    if missing:
        raise SurgeryError(
            f"the data in {data_dir} has no domain(s) {missing} (it has {sorted(available)}); "
            "prepare the built-in corpus (omit --data) or choose --old-domains/--new-domain "
            "among its domains"
        )
    if new_domain in old_domains or not old_domains:
        raise SurgeryError(
            f"the new domain {new_domain!r} must not be among the old ones {list(old_domains)}, "
            "and there must be at least one old domain"
        )


# ---- training and evaluation -----------------------------------------------------------


def train_run(
    s: ForgettingSettings,
    out_dir: Path,
    domains: Sequence[str],
    steps: int,
    checkpoint_every: int = 0,
    **model: Any,
) -> dict[str, Any]:
    """Train with the real trainer; `checkpoint_every` > 0 keeps a checkpoint every that
    many steps (the trajectory). Returns the trainer's final record."""
    from modformer.train.config import load_train_config
    from modformer.train.trainer import train

    if out_dir.exists():  # every run starts over: never resume a stale one
        shutil.rmtree(out_dir)
    cfg = load_train_config(
        cli={
            "model": model,
            "data": {"dir": s.data_dir, "domains": list(domains), "block_size": s.block_size},
            "optim": {"lr": s.lr, "min_lr": s.lr / 10, "warmup_steps": max(steps // 20, 1)},
            "out_dir": str(out_dir),
            "seed": s.seed,
            "max_steps": steps,
            "batch_size": s.batch_size,
            "eval_interval": 0,
            "eval_batches": 1,
            "log_interval": max(steps // 10, 1),
            "ckpt_interval": checkpoint_every,
            "keep_last": steps // checkpoint_every + 1 if checkpoint_every else 1,
            "threads": s.threads,
            "progress": s.progress,
        }
    )
    return train(cfg)


def evaluate(model: torch.nn.Module, s: ForgettingSettings) -> dict[str, Any]:
    """Val loss on each domain (windows of `block_size` in order: the whole split, or its
    first `eval_batches` batches of 8), token-weighted over the old domains and over all."""
    from modformer.data.dataset import TokenDataset
    from modformer.eval.lm import evaluate_batches

    ds = TokenDataset(s.data_dir, "val")
    ds.check_vocab_fits(model.config.vocab_size)
    per_domain = {}
    with torch.no_grad():
        for domain in (*s.old_domains, s.new_domain):
            windows = ds.iter_sequential(s.block_size, 8, domain=domain)
            batches = islice(windows, s.eval_batches) if s.eval_batches else windows
            per_domain[domain] = evaluate_batches(model, batches)

    def weighted(domains: Sequence[str]) -> float:
        tokens = sum(per_domain[d]["tokens"] for d in domains)
        return sum(per_domain[d]["loss"] * per_domain[d]["tokens"] for d in domains) / tokens

    return {
        "old": weighted(s.old_domains),
        "new": per_domain[s.new_domain]["loss"],
        "all": weighted(list(per_domain)),
        "per_domain": {d: r["loss"] for d, r in per_domain.items()},
        "tokens": {d: r["tokens"] for d, r in per_domain.items()},
    }


def evaluate_dir(model_dir: Path, s: ForgettingSettings) -> dict[str, Any]:
    return evaluate(load_model_dir(model_dir), s)


def trajectory(run_dir: Path, s: ForgettingSettings, before: dict, after: dict) -> list[dict]:
    """(step, old, new) of the pretrained model (step 0), of every intermediate checkpoint
    of the run in `run_dir` (up to step `s.trajectory_until` if set), and of its end
    (`after`); the checkpoints are removed once evaluated (the final model stays in
    run_dir/model)."""
    from modformer.train.checkpoint import CKPT_RE, list_checkpoints

    points = [{"step": 0, "old": before["old"], "new": before["new"]}]
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    for ckpt in checkpoints:
        step = int(CKPT_RE.match(ckpt.name).group(1))
        if step < s.steps and (not s.trajectory_until or step <= s.trajectory_until):
            result = evaluate_dir(ckpt / "model", s)
            points.append({"step": step, "old": result["old"], "new": result["new"]})
    points.append({"step": s.steps, "old": after["old"], "new": after["new"]})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return points


def old_loss_at_new_loss(points: Sequence[dict], new_loss: float) -> dict[str, float] | None:
    """The matched-plasticity point: where a trajectory first learns the new domain down to
    `new_loss`. `points` are {step, old, new} in step order, starting at the pretrained
    model; the first consecutive pair with new[i-1] > new_loss >= new[i] is interpolated
    linearly in the new-domain loss (old loss and step alike). None when the trajectory
    never gets that low, or when `new_loss` is not below the pretrained model's (nothing
    was learned, so there is nothing to match)."""
    for prev, cur in zip(points, points[1:]):
        if prev["new"] > new_loss >= cur["new"]:
            frac = (prev["new"] - new_loss) / (prev["new"] - cur["new"])
            return {
                "old": prev["old"] + frac * (cur["old"] - prev["old"]),
                "step": prev["step"] + frac * (cur["step"] - prev["step"]),
            }
    return None


def _frozen_checksum(model: torch.nn.Module) -> list[float]:
    """fp64 sums of every non-inserted parameter, to verify the freezing after training."""
    return [
        float(p.detach().double().sum())
        for name, p in model.named_parameters()
        if not is_inserted_parameter(name)
    ]


# ---- the methods -----------------------------------------------------------------------


def pretrain(s: ForgettingSettings, run_dir: Path, arch: str) -> dict[str, Any]:
    """Train `arch` (preset `s.preset`) on the old domains into run_dir; its evaluation."""
    log.info("pretraining the %s %s on %s", s.preset, arch, s.old_domains)
    train_run(s, run_dir, s.old_domains, s.pretrain_steps, arch=arch, preset=s.preset)
    return evaluate_dir(run_dir / "model", s)


def insert_experts(s: ForgettingSettings, pretrained: Path, weight: float, out: Path) -> dict:
    """The pretrained ModuleFormer with `s.new_experts` fresh experts per layer, saved to
    `out`; the evaluation of the extended model before any training."""
    extended = extend_model(
        load_model_dir(pretrained), s.new_experts, routing_reg_weight=weight, seed=s.seed
    )
    save_model_with_tokenizer(extended, out, pretrained, method="extend")
    return evaluate(extended, s)


def continual(
    s: ForgettingSettings,
    method: str,
    start: Path,
    run_dir: Path,
    before: dict[str, Any],
    with_trajectory: bool = False,
) -> dict[str, Any]:
    """Train the model in `start` on the new domain only (its trainable scope, if any);
    the method's row: parameters, evaluations before/after and, `with_trajectory`, the
    evaluations every `s.trajectory_interval` steps."""
    log.info("continual training: %s", method)
    model = load_model_dir(start)
    counts = apply_trainable_scope(model)  # what the trainer will train
    frozen_before = _frozen_checksum(model) if counts["frozen"] else None
    interval = s.trajectory_interval if with_trajectory else 0
    final = train_run(s, run_dir, [s.new_domain], s.steps, interval, init_from=str(start))
    trained = load_model_dir(run_dir / "model")
    row: dict[str, Any] = {
        "method": method,
        "params": counts["trainable"] + counts["frozen"],
        "trainable_params": counts["trainable"],
        "train_tokens": int(final["tokens_trained"]),
        "before": before,
        "after": evaluate(trained, s),
    }
    if interval:
        row["trajectory"] = trajectory(run_dir, s, before, row["after"])
    if frozen_before is not None:
        if _frozen_checksum(trained) != frozen_before:
            raise RuntimeError(
                "continual training changed frozen parameters: the trainer did not apply "
                "the model's trainable_scope (call modformer.surgery.apply_trainable_scope "
                "after loading the model)"
            )
        row["frozen_unchanged"] = True
    return row


def _run_methods(s: ForgettingSettings, runs: Path) -> list[dict[str, Any]]:
    """Pretrain each architecture on the old domains, then train every method on the new
    domain; one row per method."""
    rows: list[dict[str, Any]] = []
    for arch in ("moduleformer", "gpt"):
        pretrained = runs / f"pretrain_{arch}"
        before = pretrain(s, pretrained, arch)
        full = continual(
            s, f"{arch} full", pretrained / "model", runs / f"{arch}_full", before, True
        )
        rows.append(full)
        if arch != "moduleformer":
            continue
        for weight in s.routing_reg_weights:
            start = runs / f"extended_reg{weight:g}"
            at_insertion = insert_experts(s, pretrained / "model", weight, start)
            name = f"moduleformer insert reg={weight:g}"
            row = continual(s, name, start, runs / name.replace(" ", "_").replace("=", ""), before)
            # The freshly inserted experts before any training: their routing share alone
            # already moves the losses.
            row["at_insertion"] = at_insertion
            if "trajectory" in full:
                row["full_at_equal_new"] = old_loss_at_new_loss(
                    full["trajectory"], row["after"]["new"]
                )
            rows.append(row)
    return rows


def run_forgetting_experiment(
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    max_bytes_per_domain: int = 1_000_000,
    vocab_size: int = 1024,
    **settings: Any,
) -> dict[str, Any]:
    """Run the experiment once (see the module docstring; `settings`: the fields of
    `ForgettingSettings`); writes out_dir/forgetting.json (atomically) and returns the same
    dict: settings, rows (one per method) and wall time.

    `data_dir`: a prepared data set holding the old and new domains; None prepares the
    built-in corpus into out_dir/data (reused when already there).
    """
    from modformer.utils import atomic_write_text

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if data_dir is None:
        data_dir = out_dir / "data"
        out_dir.mkdir(parents=True, exist_ok=True)
        prepare_builtin_data(data_dir, max_bytes_per_domain, vocab_size, settings.get("seed", 1337))
    for key in ("old_domains", "routing_reg_weights"):
        if key in settings:
            settings[key] = list(settings[key])
    s = ForgettingSettings(data_dir=str(data_dir), **settings)
    s.check()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if s.threads:  # the trainer sets it too; evaluation here runs under the same setting
        torch.set_num_threads(s.threads)
    try:
        rows = _run_methods(s, out_dir / "runs")
    finally:
        torch.set_num_threads(previous_threads)
    result = {"settings": asdict(s), "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out_dir / "forgetting.json", json.dumps(result, indent=1))
    return result


def format_forgetting_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (old = token-weighted over the old domains); the
    last column: full fine-tuning's old-domain loss where its trajectory reached the
    row's new-domain loss (and the step), "-" where it did not or was not recorded."""
    s = result["settings"]
    old, new = "+".join(s["old_domains"]), s["new_domain"]
    lines = [
        f"| method | trainable params | old ({old}) before | after | change "
        f"| new ({new}) before | after | change | full FT's old at equal new (step) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        b, a = row["before"], row["after"]
        matched = row.get("full_at_equal_new")
        at = f"{matched['old']:.3f} ({matched['step']:.0f})" if matched else "-"
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | {b['old']:.3f} | {a['old']:.3f} "
            f"| {a['old'] - b['old']:+.3f} | {b['new']:.3f} | {a['new']:.3f} "
            f"| {a['new'] - b['new']:+.3f} | {at} |"
        )
    return "\n".join(lines)

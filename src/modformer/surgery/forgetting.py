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
before and after continual training; "before" is the "freeze all" row of the paper.
Equal cost: same pretraining and continual steps and batches for every method (not equal
parameters: the ModuleFormer holds more, which is the paper's point).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
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


def _prepare_data(data_dir: Path, max_bytes_per_domain: int, vocab_size: int, seed: int):
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


def _check_domains(data_dir: Path, old_domains: Sequence[str], new_domain: str) -> None:
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


def _train(
    settings: dict[str, Any], out_dir: Path, domains: Sequence[str], steps: int, **model: Any
) -> dict[str, Any]:
    from modformer.train.config import load_train_config
    from modformer.train.trainer import train

    if out_dir.exists():  # every run starts over: never resume a stale one
        shutil.rmtree(out_dir)
    cfg = load_train_config(
        cli={
            "model": model,
            "data": {
                "dir": settings["data_dir"],
                "domains": list(domains),
                "block_size": settings["block_size"],
            },
            "optim": {
                "lr": settings["lr"],
                "min_lr": settings["lr"] / 10,
                "warmup_steps": max(steps // 20, 1),
            },
            "out_dir": str(out_dir),
            "seed": settings["seed"],
            "max_steps": steps,
            "batch_size": settings["batch_size"],
            "eval_interval": 0,
            "eval_batches": 1,
            "log_interval": max(steps // 10, 1),
            "ckpt_interval": 0,
            "keep_last": 1,
            "threads": settings["threads"],
            "progress": settings["progress"],
        }
    )
    return train(cfg)


def _evaluate(model_dir: Path, settings: dict[str, Any], old_domains, new_domain) -> dict:
    """Val loss on each domain (the first `eval_batches` batches of its windows, in
    order), token-weighted over the old domains."""
    from modformer.data.dataset import TokenDataset
    from modformer.eval.lm import evaluate_batches

    model = load_model_dir(model_dir)
    ds = TokenDataset(settings["data_dir"], "val")
    ds.check_vocab_fits(model.config.vocab_size)
    per_domain = {}
    for domain in (*old_domains, new_domain):
        windows = ds.iter_sequential(settings["block_size"], 8, domain=domain)
        batches = (b for _, b in zip(range(settings["eval_batches"]), windows))
        per_domain[domain] = evaluate_batches(model, batches)
    old_tokens = sum(per_domain[d]["tokens"] for d in old_domains)
    return {
        "old": sum(per_domain[d]["loss"] * per_domain[d]["tokens"] for d in old_domains)
        / old_tokens,
        "new": per_domain[new_domain]["loss"],
        "per_domain": {d: r["loss"] for d, r in per_domain.items()},
    }


def _frozen_checksum(model: torch.nn.Module) -> list[float]:
    """fp64 sums of every non-inserted parameter, to verify the freezing after training."""
    return [
        float(p.detach().double().sum())
        for name, p in model.named_parameters()
        if not is_inserted_parameter(name)
    ]


def run_forgetting_experiment(
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    pretrain_steps: int = 300,
    steps: int = 150,
    new_experts: int = 2,
    routing_reg_weights: Sequence[float] = DEFAULT_REG_WEIGHTS,
    old_domains: Sequence[str] = DEFAULT_OLD_DOMAINS,
    new_domain: str = DEFAULT_NEW_DOMAIN,
    preset: str = "tiny",
    batch_size: int = 16,
    block_size: int = 64,
    lr: float = 2e-3,
    eval_batches: int = 4,
    max_bytes_per_domain: int = 1_000_000,
    vocab_size: int = 1024,
    seed: int = 1337,
    threads: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the experiment (see the module docstring); writes out_dir/forgetting.json
    (atomically) and returns the same dict: settings, rows (one per method) and wall time.

    `data_dir`: a prepared data set holding the old and new domains; None prepares the
    built-in corpus into out_dir/data (reused when already there).
    """
    from modformer.utils import atomic_write_text

    for name, value in (("pretrain_steps", pretrain_steps), ("steps", steps)):
        if value < 1:
            raise SurgeryError(f"{name} must be >= 1, got {value}")
    if new_experts < 1:
        raise SurgeryError(f"new_experts must be >= 1, got {new_experts}")
    if not routing_reg_weights or any(not w >= 0 for w in routing_reg_weights):
        raise SurgeryError(
            f"routing_reg_weights must be one or more weights >= 0, got {routing_reg_weights}"
        )
    if threads < 0:
        raise SurgeryError(f"threads must be >= 0 (0: torch's default), got {threads}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data_dir is None:
        data_dir = out_dir / "data"
        _prepare_data(data_dir, max_bytes_per_domain, vocab_size, seed)
    data_dir = Path(data_dir)
    _check_domains(data_dir, old_domains, new_domain)
    settings = dict(
        data_dir=str(data_dir),
        block_size=block_size,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_batches=eval_batches,
        threads=threads,
        progress=progress,
        pretrain_steps=pretrain_steps,
        steps=steps,
        new_experts=new_experts,
        routing_reg_weights=list(routing_reg_weights),
        old_domains=list(old_domains),
        new_domain=new_domain,
        preset=preset,
    )
    previous_threads = torch.get_num_threads()
    if threads:  # the trainer sets it too; evaluation here runs under the same setting
        torch.set_num_threads(threads)
    try:
        rows = _run_methods(settings, out_dir / "runs")
    finally:
        torch.set_num_threads(previous_threads)
    result = {"settings": settings, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out_dir / "forgetting.json", json.dumps(result, indent=1))
    return result


def _run_methods(settings: dict[str, Any], runs: Path) -> list[dict[str, Any]]:
    """Pretrain each architecture on the old domains, then train every method on the new
    domain; one row per method."""
    old_domains, new_domain = settings["old_domains"], settings["new_domain"]
    rows: list[dict[str, Any]] = []

    def evaluate(model_dir: Path) -> dict[str, Any]:
        return _evaluate(model_dir, settings, old_domains, new_domain)

    def continual(name: str, start: Path, before: dict[str, Any]) -> dict[str, Any]:
        """Train `start` on the new domain only."""
        log.info("continual training: %s", name)
        model = load_model_dir(start)
        counts = apply_trainable_scope(model)  # what the trainer will train
        frozen_before = _frozen_checksum(model) if counts["frozen"] else None
        run_dir = runs / name.replace(" ", "_").replace("=", "")
        _train(settings, run_dir, [new_domain], settings["steps"], init_from=str(start))
        row = {
            "method": name,
            "params": counts["trainable"] + counts["frozen"],
            "trainable_params": counts["trainable"],
            "before": before,
            "after": evaluate(run_dir / "model"),
        }
        if frozen_before is not None:
            if _frozen_checksum(load_model_dir(run_dir / "model")) != frozen_before:
                raise RuntimeError(
                    "continual training changed frozen parameters: the trainer did not apply "
                    "the model's trainable_scope (call modformer.surgery.apply_trainable_scope "
                    "after loading the model)"
                )
            row["frozen_unchanged"] = True
        rows.append(row)
        return row

    for arch in ("moduleformer", "gpt"):
        log.info("pretraining the %s %s on %s", settings["preset"], arch, old_domains)
        pre_dir = runs / f"pretrain_{arch}"
        _train(
            settings,
            pre_dir,
            old_domains,
            settings["pretrain_steps"],
            arch=arch,
            preset=settings["preset"],
        )
        pretrained = pre_dir / "model"
        before = evaluate(pretrained)
        continual(f"{arch} full", pretrained, before)
        if arch != "moduleformer":
            continue
        for weight in settings["routing_reg_weights"]:
            extended = extend_model(
                load_model_dir(pretrained),
                settings["new_experts"],
                routing_reg_weight=weight,
                seed=settings["seed"],
            )
            start = runs / f"extended_reg{weight:g}"
            save_model_with_tokenizer(extended, start, pretrained, method="extend")
            row = continual(f"moduleformer insert reg={weight:g}", start, before)
            # The freshly inserted experts before any training: their routing share alone
            # already moves the losses.
            row["at_insertion"] = evaluate(start)
    return rows


def format_forgetting_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (old = token-weighted over the old domains)."""
    s = result["settings"]
    old, new = "+".join(s["old_domains"]), s["new_domain"]
    lines = [
        f"| method | trainable params | old ({old}) before | after | change "
        f"| new ({new}) before | after | change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        b, a = row["before"], row["after"]
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} | {b['old']:.3f} | {a['old']:.3f} "
            f"| {a['old'] - b['old']:+.3f} | {b['new']:.3f} | {a['new']:.3f} "
            f"| {a['new'] - b['new']:+.3f} |"
        )
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------


def run_forgetting(args: argparse.Namespace) -> dict[str, Any]:
    result = run_forgetting_experiment(
        args.out_dir,
        data_dir=args.data,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        new_experts=args.new_experts,
        routing_reg_weights=args.reg_weights,
        old_domains=[d for d in args.old_domains.split(",") if d],
        new_domain=args.new_domain,
        preset=args.preset,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        eval_batches=args.eval_batches,
        max_bytes_per_domain=args.max_bytes_per_domain,
        vocab_size=args.vocab_size,
        seed=args.seed,
        threads=args.threads,
        progress=args.progress,
    )
    print(format_forgetting_table(result))
    print(f"\nwall time {result['wall_s']:.0f} s; wrote {Path(args.out_dir) / 'forgetting.json'}")
    return result

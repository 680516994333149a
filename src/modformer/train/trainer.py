"""The training loop: AdamW + warm-up/cosine, clipping, accumulation, autocast, periodic
evaluation, metrics, atomic checkpoints, exact resume, DistributedDataParallel and FSDP2.

Resumption is exact on CPU fp32 because nothing depends on wall-clock state: the global
batch of step s (batch_size x grad_accum x processes windows) is drawn from a generator
seeded by (seed, step), and each rank trains on its own slice of it; the checkpoint holds
the model, optimizer, scheduler and every rank's RNG states of the step it was taken.
Because the data is defined by global position, a run resumed on another number of
processes with the same global batch sees the same windows (see docs/distributed.md).

The loop's parts live beside it in `modformer.train`: `optim` (AdamW and the schedule),
`batches` (what each step reads), `metrics` (metrics.jsonl and progress lines), `resume`
(whether a checkpoint fits, and restoring it), `distributed` (process group, FSDP, DDP
checks), `checkpoint` and `dist_checkpoint` (the files).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from modformer.config import ConfigError
from modformer.data.dataset import TokenDataset
from modformer.errors import ModformerError
from modformer.models.loading import ModelLoadError, check_finite, load_pretrained
from modformer.models.model_card import Provenance
from modformer.models.registry import build_config, build_model
from modformer.models.trainable import apply_trainable_scope
from modformer.train import checkpoint as ckpt_lib
from modformer.train import dist_checkpoint as dcp_lib
from modformer.train.batches import SequentialStream, batch_generator
from modformer.train.config import TrainConfig
from modformer.train.distributed import (
    DistInfo,
    all_reduce_mean,
    cleanup,
    init_distributed,
    ranks_in_sync,
    resolve_device,
    shard_model,
)
from modformer.train.evaluate import evaluate_batches
from modformer.train.metrics import MetricsWriter, format_duration, to_jsonable, val_line
from modformer.train.optim import lr_at, make_optimizer
from modformer.train.resume import restore_checkpoint
from modformer.utils import DirectoryLock, atomic_write_text, check_output_path

log = logging.getLogger("modformer.train")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a training out_dir holds once a run has written results: replaced only with overwrite.
RESULT_FILES = ("model", "final.json", "metrics.jsonl")


class NonFiniteError(ModformerError):
    """Training produced a NaN/inf loss, gradient norm or model; nothing bad was saved."""


def load_or_build_model(cfg: TrainConfig, vocab_size: int) -> PreTrainedModel:
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.init_from: {path} is not a saved model directory (no config.json); "
                "point it at the output of `modformer train` or `modformer convert`"
            )
        try:
            model = load_pretrained(path)
        except ModelLoadError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        if cfg.model.overrides:
            log.warning("model.overrides are ignored when model.init_from is set")
    else:
        overrides = dict(cfg.model.overrides)
        overrides.setdefault("vocab_size", vocab_size)
        try:
            config = build_config(cfg.model.arch, cfg.model.preset, **overrides)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        model = build_model(config)
    # A model saved by `modformer extend` trains only its inserted experts: re-apply the
    # freezing its config records (a no-op for every other model).
    apply_trainable_scope(model)
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"the data's vocabulary ({vocab_size} tokens) does not fit the model's vocab_size "
            f"({model.config.vocab_size}); prepare the data with a smaller tokenizer or raise "
            "model.overrides.vocab_size"
        )
    return model


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run training as configured; returns the final metrics (rank 0's view).

    `resume` continues from the newest intact checkpoint in out_dir; `overwrite` allows a
    fresh run to replace the results (final model, metrics, checkpoints) already there.
    While it runs, rank 0 holds out_dir's DirectoryLock, so a second run there fails fast.
    """
    cfg.validate()
    out_dir = check_output_path(cfg.out_dir, "out_dir", directory=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    joined_existing_group = dist.is_initialized()  # e.g. several runs in one torchrun job
    is_main = (dist.get_rank() if joined_existing_group else int(os.environ.get("RANK", "0"))) == 0
    lock = DirectoryLock(out_dir, "training run") if is_main else None
    if lock is not None:
        lock.acquire()
    try:
        if is_main:
            ckpt_lib.clean_stale(out_dir / "checkpoints")
            ckpt_lib.clean_stale(out_dir)
        info = init_distributed(device)
        try:
            return _train(cfg, resume, overwrite, device, info)
        finally:
            if not joined_existing_group:
                cleanup(info)
    finally:
        if lock is not None:
            lock.release()


def _prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool, has_checkpoints: bool) -> None:
    """Refuse to replace an earlier run's results unless asked to (rank 0, fresh start)."""
    if has_checkpoints and not overwrite:
        raise ConfigError(
            f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
            "--overwrite to replace it, or choose another out_dir"
        )
    results = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if results and not overwrite:
        why = " and no checkpoint to resume from" if resume else ""
        raise ConfigError(
            f"{out_dir} holds the results of an earlier run ({', '.join(results)}){why}; "
            "pass --overwrite to replace them, or choose another out_dir"
        )
    if overwrite:
        import shutil

        for name in (*RESULT_FILES, "checkpoints"):
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _nonfinite_message(
    step: int, loss: float, grad_norm: float | None, ckpt_root: Path, cfg: TrainConfig
) -> str:
    norm = f", gradient norm {grad_norm}" if grad_norm is not None else ""
    last = ckpt_lib.latest_checkpoint(ckpt_root)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    return (
        f"training diverged at step {step}: loss {loss}{norm}. Nothing of this step was "
        f"saved and {kept}. Lower optim.lr (now {cfg.optim.lr:g}) or raise optim.warmup_steps, "
        "then start again (or --resume); nonfinite=skip skips such steps instead"
    )


def _train(
    cfg: TrainConfig, resume: bool, overwrite: bool, device: torch.device, info: DistInfo
) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)

    train_ds = TokenDataset(cfg.data.dir, "train", domains=cfg.data.domains)
    val_ds = TokenDataset(cfg.data.dir, "val", domains=cfg.data.domains)
    model = load_or_build_model(cfg, train_ds.vocab_size)
    for ds in (train_ds, val_ds):  # at the door, not as an IndexError mid-training
        ds.check_vocab_fits(model.config.vocab_size)
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and cfg.data.block_size > n_positions:
        raise ConfigError(
            f"data.block_size ({cfg.data.block_size}) exceeds the model's n_positions ({n_positions})"
        )
    if getattr(model.config, "use_history", False) and not cfg.data.sequential:
        raise ConfigError(
            "the model uses Transformer-XL history (use_history=true), which needs each batch "
            "to continue the previous one: set data.sequential=true (or use_history=false)"
        )
    model.to(device)
    model.train()
    if cfg.activation_checkpointing:
        # Before sharding: HF checkpoints each layer's forward, FSDP's hooks stay outside.
        model.activation_checkpointing_enable()
    model_class = type(model)  # fully_shard swaps in an FSDP subclass
    # Every rank built the same initial weights from cfg.seed (FSDP shards them in place);
    # from here on each rank draws from its own stream (rank 0 keeps the 1-process one).
    if info.rank > 0:
        dcp_lib.seed_rank_rng(cfg.seed, info.rank)
    fsdp = cfg.parallel == "fsdp"
    if fsdp and info.enabled:
        try:
            shard_model(model, cfg.precision)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.compile:
        # In place (nn.Module.compile): parameters, state_dict keys and checkpoints stay
        # those of the plain model. Eval mode compiles a second graph on first use.
        model.compile()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.optim.lr)

    start_step = 0
    resume_from = (
        ckpt_lib.find_resume_checkpoint(ckpt_root, move_aside=info.is_main) if resume else None
    )
    if resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_root)
    if resume_from is not None:
        start_step = restore_checkpoint(
            resume_from, cfg, info, model, model_class, optimizer, scheduler
        )
        if info.is_main:
            log.info("resumed from %s at step %d", resume_from, start_step)
    elif info.is_main:
        _prepare_out_dir(out_dir, resume, overwrite, bool(ckpt_lib.list_checkpoints(ckpt_root)))

    # Routed models leave some modules unselected in a step; DDP must not wait for them.
    find_unused = model.config.model_type != "modformer_gpt"
    if info.enabled and not fsdp:
        ddp_model = DDP(model, find_unused_parameters=find_unused)
    else:
        ddp_model = model  # FSDP shards `model` in place; it is its own wrapper
    autocast_dtype = AUTOCAST_DTYPES[cfg.precision]
    scaler = torch.amp.GradScaler(
        device.type, enabled=cfg.precision == "fp16" and device.type == "cuda"
    )
    metrics = MetricsWriter(
        out_dir, info.is_main, cfg.tensorboard, start_step if resume_from else None
    )
    stream = (
        SequentialStream(train_ds, cfg.batch_size, cfg.data.block_size, info.rank, info.world_size)
        if cfg.data.sequential
        else None
    )
    memory = None
    tokenizer_dir = Path(cfg.data.dir) / "tokenizer"

    def evaluate() -> dict[str, float]:
        batches = (
            val_ds.get_batch(cfg.batch_size, cfg.data.block_size, batch_generator(0, i, 0, 0))
            for i in range(cfg.eval_batches)
        )
        result = evaluate_batches(model, batches, device, autocast_dtype)
        loss = all_reduce_mean(torch.tensor(result["loss"], device=device), info)
        return {"val_loss": float(loss), "val_ppl": math.exp(min(float(loss), 50.0))}

    def save(step: int) -> None:
        common = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "config": asdict(cfg),
            "world_size": info.world_size,
            "data_position": {"next_step": step, "sequential": cfg.data.sequential},
        }
        if fsdp:
            dcp_lib.save_sharded_checkpoint(
                ckpt_root, step, model, optimizer, common, cfg.keep_last
            )
            return
        # Every rank's RNG states, gathered to rank 0 (each rank draws its own dropout etc.).
        rng: list[Any] = [ckpt_lib.rng_state()]
        if info.enabled:
            rng = [None] * info.world_size
            dist.all_gather_object(rng, ckpt_lib.rng_state())
        if info.is_main:
            state = {**common, "optimizer": optimizer.state_dict(), "rng": rng}
            ckpt_lib.save_checkpoint(
                ckpt_root, step, model, state, cfg.keep_last, tokenizer_dir=tokenizer_dir
            )
        if info.enabled:
            dist.barrier()

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.data.block_size * info.world_size
    # A bar only on a terminal; otherwise (progress false, nohup, Slurm) rank 0 prints a
    # line every log_interval steps and at every evaluation.
    show_bar = info.is_main and cfg.progress and sys.stderr.isatty()
    print_lines = info.is_main and not show_bar
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not show_bar,
        unit="step",
        dynamic_ncols=True,
    )
    last_eval: dict[str, float] = {}
    t_start = t_last = time.perf_counter()
    steps_since = 0
    skipped = 0  # non-finite steps skipped under nonfinite=skip
    rows_per_rank = cfg.batch_size * cfg.grad_accum
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        aux_metrics: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=device)
        lm_sum = torch.zeros((), device=device)
        if stream is None:
            # The whole global batch of this step, by global position; this rank's rows
            # are the slice [rank * rows_per_rank, (rank + 1) * rows_per_rank).
            step_batch = train_ds.get_batch(
                rows_per_rank * info.world_size,
                cfg.data.block_size,
                batch_generator(cfg.seed, step, 0, 0),
            )[info.rank * rows_per_rank : (info.rank + 1) * rows_per_rank]
        for micro in range(cfg.grad_accum):
            if stream is not None:
                x = stream.batch(step * cfg.grad_accum + micro)
            else:
                x = step_batch[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            x = x.to(device)
            sync = micro == cfg.grad_accum - 1 or not info.enabled
            if fsdp and info.enabled:
                ddp_model.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
            with (
                ctx,
                torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ),
            ):
                kwargs = {"memory": memory} if memory is not None else {}
                out = ddp_model(input_ids=x, labels=x, use_cache=False, **kwargs)
                loss = out.loss / cfg.grad_accum
            scaler.scale(loss).backward()
            memory = getattr(out, "memory", None) if stream is not None else None
            loss_sum += loss.detach()
            lm = out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss
            lm_sum += lm.detach() / cfg.grad_accum
            for key, value in (getattr(out, "aux_metrics", None) or {}).items():
                aux_metrics[key] = aux_metrics.get(key, 0) + value.detach() / cfg.grad_accum
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if cfg.optim.grad_clip > 0
            else torch.nn.utils.get_total_norm(grads)
        )
        if hasattr(grad_norm, "full_tensor"):  # under FSDP a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        done = step + 1
        # One host sync per step: a NaN/inf must be caught before the update puts it into
        # the weights. fp16's GradScaler skips steps with inf gradients itself, so there
        # only the loss is checked. The flag is all-reduced so every rank decides alike.
        health = loss_sum if scaler.is_enabled() else loss_sum + grad_norm
        bad = all_reduce_mean((~torch.isfinite(health)).float(), info)
        if bool(bad > 0):
            loss_now, norm_now = float(loss_sum), float(grad_norm)
            optimizer.zero_grad(set_to_none=True)
            if cfg.nonfinite == "stop":
                metrics.write({"step": done, "nonfinite": True, "loss": loss_now})
                raise NonFiniteError(_nonfinite_message(done, loss_now, norm_now, ckpt_root, cfg))
            skipped += 1
            log.warning(
                "step %d: loss %s, gradient norm %s: step skipped", done, loss_now, norm_now
            )
            scaler.update()
            scheduler.step()
            bar.update(1)
            continue
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps_since += 1

        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - t_last
            tok_s = tokens_per_step * steps_since / max(elapsed, 1e-9)
            t_last, steps_since = time.perf_counter(), 0
            loss_val = float(all_reduce_mean(loss_sum, info))
            record: dict[str, Any] = {
                "step": done,
                "loss": loss_val,
                "lm_loss": float(all_reduce_mean(lm_sum, info)),
                "lr": lr,
                "tokens_per_s": tok_s,
                "tokens_seen": done * tokens_per_step,
            }
            record["grad_norm"] = float(grad_norm)
            if skipped:
                record["skipped_steps"] = skipped
            record.update({k: to_jsonable(v) for k, v in aux_metrics.items()})
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if print_lines:
                per_step = (time.perf_counter() - t_start) / (done - start_step)
                print(
                    f"step {done}/{cfg.max_steps}  loss {loss_val:.4f}  lr {lr:.2e}  "
                    f"tokens/s {tok_s:,.0f}  ETA {format_duration(per_step * (cfg.max_steps - done))}",
                    flush=True,
                )

        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.max_steps:
            last_eval = evaluate()
            metrics.write({"step": done, **last_eval})
            if print_lines:
                print(val_line(done, cfg.max_steps, last_eval), flush=True)
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done != cfg.max_steps:
            save(done)
        bar.update(1)
    bar.close()

    last_eval = evaluate()
    if print_lines:
        print(val_line(cfg.max_steps, cfg.max_steps, last_eval), flush=True)
    if not math.isfinite(last_eval["val_loss"]):
        raise NonFiniteError(
            f"the final validation loss is {last_eval['val_loss']}: the model is broken, so it "
            f"was not saved ({skipped} step(s) skipped as non-finite); lower optim.lr and train again"
        )
    final: dict[str, Any] = {"step": cfg.max_steps, **last_eval}
    if skipped:
        final["skipped_steps"] = skipped
    if info.enabled and not fsdp:
        final["ranks_in_sync"] = ranks_in_sync(model, info)
    metrics.write(final)
    save(cfg.max_steps)
    export = model
    if fsdp and info.enabled:
        # A normal HF directory from the shards: gather the full state on rank 0 and load
        # it into an unsharded copy of the model there.
        full_state = dcp_lib.gather_full_model_state(model)
        if info.is_main:
            export = model_class(model.config)
            export.load_state_dict(full_state)
    if info.is_main:
        try:  # on the unsharded model: FSDP's local shards would not agree across ranks
            check_finite(export, "the trained model")
        except ModelLoadError as e:
            raise NonFiniteError(f"{e}; it was not saved") from None
        provenance = Provenance(
            method="train",
            source=cfg.model.init_from,
            data=cfg.data.dir,
            steps=cfg.max_steps,
            tokens=cfg.max_steps * tokens_per_step,
            val_loss=last_eval.get("val_loss"),
        )
        ckpt_lib.atomic_save_model(export, out_dir / "model", tokenizer_dir, provenance)
        final.update(
            {"params": export.num_parameters(), "tokens_trained": cfg.max_steps * tokens_per_step}
        )
        atomic_write_text(out_dir / "final.json", json.dumps(final, indent=2))
    metrics.close()
    return final

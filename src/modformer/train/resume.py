"""Exact resumption: check that a checkpointed run fits the current settings (adapting the
per-process batch when the number of processes changed) and restore its state."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from modformer.config import ConfigError
from modformer.models.loading import ModelLoadError, load_pretrained
from modformer.train import checkpoint as ckpt_lib
from modformer.train import dist_checkpoint as dcp_lib
from modformer.train.config import TrainConfig
from modformer.train.distributed import DistInfo

log = logging.getLogger("modformer.train")


def restore_checkpoint(
    resume_from: Path,
    cfg: TrainConfig,
    info: DistInfo,
    model: nn.Module,
    model_class: type[PreTrainedModel],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Load the checkpoint `resume_from` into the model, optimizer, scheduler and this
    rank's RNG streams; returns the step to continue from. A checkpoint of other settings
    or another parallel mode is a clear error."""
    sharded = dcp_lib.is_sharded_checkpoint(resume_from)
    if sharded != (cfg.parallel == "fsdp"):
        written_by = "fsdp" if sharded else "ddp"
        raise ConfigError(
            f"--resume: {resume_from} was written by a parallel={written_by} run; "
            f"resume it with parallel={written_by}"
        )
    if sharded:
        ckpt_lib.verify_checkpoint(resume_from)
        state = dcp_lib.load_trainer_state_json(resume_from)
    else:
        state = ckpt_lib.load_trainer_state(resume_from)  # verified against its manifest
    try:
        saved_world = state.get("world_size", info.world_size)
        check_resume_compatible(state["config"], cfg, saved_world, info.world_size)
        if sharded:
            dcp_lib.load_sharded_checkpoint(resume_from, model, optimizer)
            dcp_lib.restore_rank_rng(resume_from, info.rank, cfg.seed)
        else:
            loaded = load_pretrained(resume_from / "model", model_class)
            model.load_state_dict(loaded.state_dict())
            optimizer.load_state_dict(state["optimizer"])
            if info.rank < len(state["rng"]):
                ckpt_lib.set_rng_state(state["rng"][info.rank])
            else:  # more processes than the checkpointed run: a fresh stream for this rank
                dcp_lib.seed_rank_rng(cfg.seed, info.rank)
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])
    except (ConfigError, ckpt_lib.CheckpointError):
        raise
    except (ModelLoadError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ckpt_lib.CheckpointError(
            f"checkpoint {resume_from} does not fit this run's model ({message}); resume "
            "with the settings it was written with, or use a new out_dir"
        ) from None


def check_resume_compatible(
    saved: dict[str, Any], cfg: TrainConfig, saved_world: int, world: int
) -> None:
    """Same model, data and seed; the same global batch, adapting grad_accum (or else the
    per-process batch) when the number of processes changed. May update `cfg`."""
    now = asdict(cfg)
    for section in ("model", "data"):
        for key, value in saved[section].items():
            if now[section].get(key) != value:
                raise ConfigError(
                    f"--resume: {section}.{key} was {value!r} in the checkpointed run but is "
                    f"{now[section].get(key)!r} now; resume with the same settings or use a new out_dir"
                )
    for key in ("seed", "parallel"):
        if saved.get(key, "ddp") != now[key]:
            raise ConfigError(
                f"--resume: {key} was {saved.get(key, 'ddp')!r} but is {now[key]!r} now; "
                f"resume with {key}={saved.get(key, 'ddp')}"
            )
    resolve_resume_batch(cfg, saved["batch_size"], saved["grad_accum"], saved_world, world)


def resolve_resume_batch(
    cfg: TrainConfig, saved_batch: int, saved_accum: int, saved_world: int, world: int
) -> None:
    """Keep the global batch (batch_size x grad_accum x processes) of the checkpointed run.

    If the user kept batch_size and grad_accum but the process count changed, grad_accum is
    rescaled (or, if that is not a whole number, batch_size). A global batch that cannot be
    kept is an error unless allow_batch_change is set.
    """
    saved_global = saved_batch * saved_accum * saved_world
    now_global = cfg.batch_size * cfg.grad_accum * world
    if now_global == saved_global:
        return
    if world != saved_world and (cfg.batch_size, cfg.grad_accum) == (saved_batch, saved_accum):
        per_rank = saved_global / world
        if cfg.data.sequential:
            # Sequential rows are split by position over batch_size x processes rows.
            options = [("batch_size", per_rank / cfg.grad_accum)]
        else:
            options = [
                ("grad_accum", per_rank / cfg.batch_size),
                ("batch_size", per_rank / cfg.grad_accum),
            ]
        for field, value in options:
            if value >= 1 and value == int(value):
                setattr(cfg, field, int(value))
                log.warning(
                    "--resume on %d processes (checkpoint: %d): %s set to %d to keep the "
                    "global batch of %d sequences",
                    world,
                    saved_world,
                    field,
                    int(value),
                    saved_global,
                )
                return
    if cfg.allow_batch_change:
        log.warning(
            "--resume: global batch changes from %d to %d sequences (allow_batch_change=true)",
            saved_global,
            now_global,
        )
        return
    raise ConfigError(
        f"--resume: the checkpointed run's global batch was {saved_global} sequences "
        f"(batch_size {saved_batch} x grad_accum {saved_accum} x {saved_world} processes); "
        f"now it would be {now_global} (batch_size {cfg.batch_size} x grad_accum "
        f"{cfg.grad_accum} x {world} processes) and no whole grad_accum or batch_size keeps "
        "it. Choose batch_size and grad_accum that keep it, or pass allow_batch_change=true "
        "to train on with the new global batch"
    )

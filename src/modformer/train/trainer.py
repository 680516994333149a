"""The training loop: AdamW + warm-up/cosine, clipping, accumulation, autocast, periodic
evaluation, metrics, atomic checkpoints, exact resume and DistributedDataParallel.

Resumption is exact on CPU fp32 because nothing depends on wall-clock state: the batch of
step s is drawn from a generator seeded by (seed, step, rank, micro-step), and the
checkpoint holds the model, optimizer, scheduler and RNG states of the step it was taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from modformer.config import ConfigError
from modformer.data.dataset import TokenDataset
from modformer.eval.lm import evaluate_batches
from modformer.models.registry import build_config, build_model
from modformer.surgery import apply_trainable_scope
from modformer.train import checkpoint as ckpt_lib
from modformer.train.config import TrainConfig
from modformer.train.distributed import (
    DistInfo,
    all_reduce_mean,
    cleanup,
    init_distributed,
    resolve_device,
)

log = logging.getLogger("modformer.train")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to optim.lr, then cosine decay to optim.min_lr at max_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(cfg.max_steps - o.warmup_steps, 1)
    progress = min((step - o.warmup_steps) / span, 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on >= 2-D weights (matrices, embeddings) only; not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps
    )


def batch_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 131 + micro)
    return g


def load_or_build_model(cfg: TrainConfig, vocab_size: int) -> PreTrainedModel:
    if cfg.model.init_from:
        path = Path(cfg.model.init_from)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.init_from: {path} is not a saved model directory (no config.json); "
                "point it at the output of `modformer train` or `modformer convert`"
            )
        model = AutoModelForCausalLM.from_pretrained(path)
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


class MetricsWriter:
    """JSONL metrics (and optional TensorBoard), written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop entries past the checkpoint: those steps are about to be redone.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "tensorboard=true needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to_jsonable(value: torch.Tensor) -> float | list[float]:
    value = value.detach().float().cpu()
    return value.item() if value.numel() == 1 else [round(v, 6) for v in value.flatten().tolist()]


def _check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = asdict(cfg)
    for section in ("model", "data"):
        for key, value in saved[section].items():
            if now[section].get(key) != value:
                raise ConfigError(
                    f"--resume: {section}.{key} was {value!r} in the checkpointed run but is "
                    f"{now[section].get(key)!r} now; resume with the same settings or use a new out_dir"
                )
    for key in ("batch_size", "grad_accum", "seed"):
        if saved[key] != now[key]:
            raise ConfigError(f"--resume: {key} was {saved[key]!r} but is {now[key]!r} now")


class SequentialStream:
    """Each batch row reads consecutive segments of its own slice of the token stream, so a
    model with Transformer-XL history sees segment s+1 right after segment s."""

    def __init__(
        self, dataset: TokenDataset, batch_size: int, block_size: int, rank: int, world: int
    ):
        tokens = dataset.tokens
        rows = batch_size * world
        self.row_len = len(tokens) // rows
        if self.row_len < block_size:
            raise ConfigError(
                f"data.sequential: {len(tokens)} tokens cannot feed {rows} rows of {block_size}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.starts = [(rank * batch_size + b) * self.row_len for b in range(batch_size)]
        self.segments_per_row = self.row_len // block_size

    def batch(self, index: int) -> torch.Tensor:
        offset = (index % self.segments_per_row) * self.block_size
        rows = [self.tokens[s + offset : s + offset + self.block_size] for s in self.starts]
        return torch.as_tensor(np.stack(rows).astype(np.int64))


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run training as configured; returns the final metrics (rank 0's view)."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(device)
    try:
        return _train(cfg, resume, device, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, resume: bool, device: torch.device, info: DistInfo) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)

    train_ds = TokenDataset(cfg.data.dir, "train", domains=cfg.data.domains)
    val_ds = TokenDataset(cfg.data.dir, "val", domains=cfg.data.domains)
    model = load_or_build_model(cfg, train_ds.vocab_size)
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and cfg.data.block_size > n_positions:
        raise ConfigError(
            f"data.block_size ({cfg.data.block_size}) exceeds the model's n_positions ({n_positions})"
        )
    model.to(device)
    model.train()
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable()
    if cfg.compile:
        # In place (nn.Module.compile): parameters, state_dict keys and checkpoints stay
        # those of the plain model. Eval mode compiles a second graph on first use.
        model.compile()
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.optim.lr)

    start_step = 0
    resume_from = ckpt_lib.latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_root)
    if resume_from is not None:
        state = ckpt_lib.load_trainer_state(resume_from)
        _check_resume_compatible(state["config"], cfg)
        loaded = type(model).from_pretrained(resume_from / "model")
        model.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt_lib.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        start_step = state["step"]
        if info.is_main:
            log.info("resumed from %s at step %d", resume_from, start_step)
    elif info.is_main and out_dir.exists() and ckpt_lib.list_checkpoints(ckpt_root):
        raise ConfigError(
            f"{out_dir} already holds checkpoints; pass --resume to continue that run or choose another out_dir"
        )

    # Routed models leave some modules unselected in a step; DDP must not wait for them.
    find_unused = model.config.model_type != "modformer_gpt"
    ddp_model = DDP(model, find_unused_parameters=find_unused) if info.enabled else model
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
        if info.is_main:
            rng = [ckpt_lib.rng_state()]
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "config": asdict(cfg),
                "data_position": {"next_step": step, "sequential": cfg.data.sequential},
            }
            ckpt_lib.save_checkpoint(
                ckpt_root, step, model, state, cfg.keep_last, tokenizer_dir=tokenizer_dir
            )
        if info.enabled:
            dist.barrier()

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.data.block_size * info.world_size
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        disable=not (info.is_main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
    )
    last_eval: dict[str, float] = {}
    t_last, steps_since = time.perf_counter(), 0
    for step in range(start_step, cfg.max_steps):
        lr = lr_at(step, cfg)
        aux_metrics: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=device)
        lm_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            if stream is not None:
                x = stream.batch(step * cfg.grad_accum + micro)
            else:
                x = train_ds.get_batch(
                    cfg.batch_size,
                    cfg.data.block_size,
                    batch_generator(cfg.seed, step, info.rank, micro),
                )
            x = x.to(device)
            sync = micro == cfg.grad_accum - 1 or not info.enabled
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
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if cfg.optim.grad_clip > 0
            else None
        )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps_since += 1
        done = step + 1

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
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record.update({k: _to_jsonable(v) for k, v in aux_metrics.items()})
            metrics.write(record)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)

        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.max_steps:
            last_eval = evaluate()
            metrics.write({"step": done, **last_eval})
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done != cfg.max_steps:
            save(done)
        bar.update(1)
    bar.close()

    last_eval = evaluate()
    final: dict[str, Any] = {"step": cfg.max_steps, **last_eval}
    if info.enabled:
        final["ranks_in_sync"] = ranks_in_sync(model, info)
    metrics.write(final)
    save(cfg.max_steps)
    if info.is_main:
        ckpt_lib.atomic_save_model(model, out_dir / "model", tokenizer_dir=tokenizer_dir)
        n_params = sum(p.numel() for p in model.parameters())
        final.update({"params": n_params, "tokens_trained": cfg.max_steps * tokens_per_step})
        (out_dir / "final.json").write_text(json.dumps(final, indent=2))
    metrics.close()
    return final


@torch.no_grad()
def ranks_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """All ranks hold identical parameters (DDP must keep them so): compare a checksum."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    checksum = torch.stack(
        [
            flat.sum(),
            (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)).sum(),
        ]
    )
    gathered = [torch.zeros_like(checksum) for _ in range(info.world_size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)

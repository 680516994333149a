"""The training configuration (`modformer train`), one dataclass per section."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modformer.config import (
    ConfigError,
    from_dict,
    load_file,
    merge,
    option,
    parse_override,
    set_path,
)


@dataclass
class ModelSection:
    arch: str = option("gpt", "architecture: gpt | mom | moduleformer")
    preset: str = option(
        "tiny", "size preset of the architecture (e.g. tiny, small, medium, large)"
    )
    init_from: str | None = option(
        None,
        "start from this saved model directory (e.g. a phase-1 model or `modformer convert` output)",
    )
    overrides: dict[str, Any] = option(
        {}, "config fields that replace the preset's, as YAML, e.g. '{n_layer: 6}'"
    )


@dataclass
class DataSection:
    dir: str = option("data/default", "prepared data directory (output of `modformer prepare`)")
    domains: list[str] | None = option(
        None, "train only on these domains of the data (default: all)"
    )
    block_size: int = option(128, "tokens per training sequence")
    sequential: bool = option(
        False,
        "feed each batch row consecutive segments of a contiguous stream (needed by "
        "Transformer-XL history) instead of random windows",
    )


@dataclass
class OptimSection:
    lr: float = option(1e-3, "peak learning rate")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(50, "linear warm-up steps")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to >= 2-D weights only")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    out_dir: str = option("runs/default", "where checkpoints, metrics and the final model go")
    seed: int = option(1337, "random seed (model init, batches, dropout)")
    max_steps: int = option(1000, "optimizer steps to train")
    batch_size: int = option(16, "sequences per micro-batch per process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    precision: str = option("fp32", "fp32, or autocast to bf16 / fp16")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    eval_interval: int = option(100, "evaluate every N steps (0: only at the end)")
    eval_batches: int = option(20, "validation batches per evaluation")
    log_interval: int = option(
        10,
        "write metrics every N steps; without a progress bar (progress false, or stderr "
        "not a terminal) also print a line: step, loss, lr, tokens/s, ETA",
    )
    ckpt_interval: int = option(100, "write a checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "checkpoints to keep")
    tensorboard: bool = option(
        False, "also write TensorBoard event files (needs tensorboard installed)"
    )
    progress: bool = option(True, "show a progress bar when stderr is a terminal")
    compile: bool = option(
        False,
        "torch.compile the model for training and evaluation (generation stays eager); "
        "the first steps are slower while it compiles",
    )
    activation_checkpointing: bool = option(
        False,
        "recompute each layer's activations in the backward pass instead of keeping them: "
        "less memory, about one more forward of compute per step",
    )
    parallel: str = option(
        "ddp",
        "under torchrun: ddp (full replicas) or fsdp (FSDP2: parameters, gradients and "
        "optimizer state sharded; sharded checkpoints)",
    )
    allow_batch_change: bool = option(
        False,
        "on --resume, accept a global batch (batch_size x grad_accum x processes) that differs "
        "from the checkpointed run's",
    )
    threads: int = option(0, "CPU threads for torch (0: torch's default)")
    nonfinite: str = option(
        "stop",
        "on a NaN/inf loss or gradient norm: stop (keeping the last good checkpoint) or skip "
        "that step's update",
    )

    def validate(self) -> None:
        checks = [
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("data.block_size", self.data.block_size >= 2, "must be >= 2"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("optim.min_lr", 0 <= self.optim.min_lr <= self.optim.lr, "must be in [0, optim.lr]"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, "must be >= 0"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, "must be >= 0"),
            ("optim.beta1", 0 <= self.optim.beta1 < 1, "must be in [0, 1)"),
            ("optim.beta2", 0 <= self.optim.beta2 < 1, "must be in [0, 1)"),
            ("optim.grad_clip", self.optim.grad_clip >= 0, "must be >= 0"),
            ("precision", self.precision in ("fp32", "bf16", "fp16"), "must be fp32, bf16 or fp16"),
            ("eval_interval", self.eval_interval >= 0, "must be >= 0"),
            ("eval_batches", self.eval_batches >= 1, "must be >= 1"),
            ("log_interval", self.log_interval >= 1, "must be >= 1"),
            ("ckpt_interval", self.ckpt_interval >= 0, "must be >= 0"),
            ("keep_last", self.keep_last >= 1, "must be >= 1"),
            ("threads", self.threads >= 0, "must be >= 0"),
            ("parallel", self.parallel in ("ddp", "fsdp"), "must be ddp or fsdp"),
        ]
        for name in (
            "optim.lr",
            "optim.min_lr",
            "optim.weight_decay",
            "optim.beta1",
            "optim.beta2",
            "optim.eps",
            "optim.grad_clip",
        ):
            value = eval_path(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        checks.append(("nonfinite", self.nonfinite in ("stop", "skip"), "must be stop or skip"))
        checks.append(("optim.eps", self.optim.eps > 0, "must be > 0"))
        for name, ok, what in checks:
            if not ok:
                value = eval_path(self, name)
                raise ConfigError(f"{name} {what}, got {value!r}")
        from modformer.models.registry import ARCHITECTURES

        if self.model.arch not in ARCHITECTURES:
            raise ConfigError(
                f"model.arch: unknown architecture {self.model.arch!r}; choose one of {sorted(ARCHITECTURES)}"
            )
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ConfigError(
                "precision=fp16 is not supported with parallel=fsdp (it needs a sharded grad "
                "scaler); use precision=bf16, which FSDP runs with bf16 compute and fp32 master "
                "weights and reductions"
            )
        if not (self.device in ("auto", "cpu", "mps", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


def eval_path(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return obj


def load_train_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cli: dict[str, Any] | None = None,
) -> TrainConfig:
    """File (optional) < `--set section.field=value` overrides < explicit `--section.field` options."""
    data = load_file(path) if path else {}
    for text in overrides or []:
        key, value = parse_override(text)
        set_path(data, key, value)
    data = merge(data, cli or {})
    cfg = from_dict(TrainConfig, data)
    cfg.validate()
    return cfg

"""Fine-tuning settings (`modformer finetune`), torch-free so the CLI can show them fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_SEPARATOR = "\nTL;DR:\n"  # GPT-2's zero-shot summarisation prompt


@dataclass
class FinetuneConfig:
    """Optimisation settings shared by both tasks.

    Steps: ``max_steps`` if set, else ``epochs`` passes over the training file. The
    learning rate warms up linearly for ``warmup_steps``, then decays linearly to 0 (the
    usual GLUE recipe). Weight decay applies to >= 2-D weights only.
    """

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    max_length: int | None = None
    eval_batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    log_interval: int = 50

    def validate(self) -> None:
        checks = [
            ("epochs", self.epochs > 0, "must be > 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("log_interval", self.log_interval >= 1, "must be >= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"fine-tuning {name} {what}, got {getattr(self, name)!r}")

    def total_steps(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(num_examples / self.batch_size)))

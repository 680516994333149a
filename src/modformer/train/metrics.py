"""What a run reports: metrics.jsonl (and TensorBoard) written by rank 0, and the progress
lines printed where no progress bar is shown."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from modformer.config import ConfigError

log = logging.getLogger("modformer.train")


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
            # Drop entries past the checkpoint: those steps are about to be redone. A line
            # that is not JSON (torn by a kill mid-write) is dropped with a warning.
            kept = []
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    step = int(record.get("step", 0))
                except (ValueError, TypeError, AttributeError):
                    log.warning(
                        "%s line %d is not a JSON record (torn write?); dropped it",
                        self.path,
                        number,
                    )
                    continue
                if step <= resume_step:
                    kept.append(line)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
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


def to_jsonable(value: torch.Tensor) -> float | list[float]:
    value = value.detach().float().cpu()
    return value.item() if value.numel() == 1 else [round(v, 6) for v in value.flatten().tolist()]


def format_duration(seconds: float) -> str:
    """1h05m, 3m07s or 42s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def val_line(step: int, max_steps: int, result: dict[str, float]) -> str:
    return (
        f"step {step}/{max_steps}  val loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}"
    )

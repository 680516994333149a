"""Device names to `torch.device`s, with a clear error for a device that is not there."""

from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={name!r} is not a device; use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device={name!r} but MPS is not available; use device=cpu or auto")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return device

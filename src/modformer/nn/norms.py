"""Normalisation layers by name: LayerNorm (GPT-2, ModuleFormer) and RMSNorm (JetMoE)."""

from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = ("layer", "rms")


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, no bias and no mean subtraction.

    The statistics are computed in fp32 (fp64 stays fp64) and cast back to the input
    dtype before the weight multiplies, as JetMoE's (T5's) RMSNorm does, so imported
    JetMoE checkpoints give the same rounding in half precision.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = x.to(torch.promote_types(x.dtype, torch.float32))
        variance = compute.pow(2).mean(-1, keepdim=True)
        return self.weight * (compute * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """``"layer"``: ``nn.LayerNorm`` (weight and bias); ``"rms"``: `RMSNorm` (weight)."""
    if norm_type == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if norm_type == "rms":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}; choose one of {list(NORM_TYPES)}")

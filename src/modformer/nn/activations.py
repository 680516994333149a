"""Activation functions by name (the names HF configs use)."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def get_activation(name: str) -> nn.Module:
    """Return a fresh activation module; unknown names raise a clear ValueError."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None

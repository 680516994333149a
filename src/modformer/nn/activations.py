"""Activation functions by name (the names HF configs use).

Not transformers' `ACT2FN`, on purpose: there ``gelu_new`` is the unfused Python formula
(five kernels, and a different last bit from the fused one), and its fused classes are
decorated to swap in kernels from the Hub when the `kernels` package is present; nothing
we run may fetch code. Each name here maps to one fused torch module with the same math.
"""

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

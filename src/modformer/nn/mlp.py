"""GPT-2 feed-forward network."""

from __future__ import annotations

import torch
from torch import nn

from modformer.nn.activations import get_activation


class MLP(nn.Module):
    """`d -> d_inner -> d` with tanh-GELU (GPT-2's `gelu_new`) by default."""

    def __init__(
        self,
        n_embd: int,
        n_inner: int,
        activation: str = "gelu_new",
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner, bias=bias)
        self.act = get_activation(activation)
        self.c_proj = nn.Linear(n_inner, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))

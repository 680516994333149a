"""Token routers for Mixture-of-Modules (SPEC §2) and per-step MoE gates.

Every router maps a token's hidden state (and, for the GRU router, its router state from
the previous assembly step) to one logit per choice. `top_k_routing` turns logits into
the selected choices and their weights: softmax in fp32, top-K, optional renormalisation.

All routers share one call signature, `router(x, state) -> (logits, new_state)`, so the
assembly code does not care which one it holds; stateless routers return `None` as state.
"""

from __future__ import annotations

import torch
from torch import nn


class GRURouter(nn.Module):
    """MoM router (paper eqs. 7-8): `s_h = GRU(x_h, s_{h-1})`, `logits = W s_h`.

    The GRU runs over assembly steps (depth), not over time: each token carries its own
    state through the H steps of a chunk, starting from zero. Gate equations follow
    `torch.nn.GRUCell` (and the official code), written out so the two projections are
    plain `nn.Linear`s that the model's weight init covers:
        r = sigmoid(W_xr x + W_hr s),  z = sigmoid(W_xz x + W_hz s),
        n = tanh(W_xn x + r * (W_hn s)),  s' = (1 - z) * n + z * s.
    """

    def __init__(self, n_embd: int, state_dim: int, num_choices: int):
        super().__init__()
        self.state_dim = state_dim
        self.x2h = nn.Linear(n_embd, 3 * state_dim)
        self.h2h = nn.Linear(state_dim, 3 * state_dim)
        self.out = nn.Linear(state_dim, num_choices)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (n, n_embd); state: (n, state_dim) or None (= zeros, the first step)."""
        gate_x = self.x2h(x)
        if state is None:
            # h2h(0) is its bias alone; skip the matmul on the zero state.
            state = gate_x.new_zeros(x.shape[0], self.state_dim)
            gate_h = self.h2h.bias.to(gate_x.dtype).expand_as(gate_x)
        else:
            gate_h = self.h2h(state)
        x_r, x_z, x_n = gate_x.chunk(3, dim=-1)
        h_r, h_z, h_n = gate_h.chunk(3, dim=-1)
        reset = torch.sigmoid(x_r + h_r)
        update = torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + reset * h_n)
        state = candidate + update * (state.to(candidate.dtype) - candidate)
        return self.out(state), state


class MLPRouter(nn.Module):
    """Ablation router (paper appendix D.1): two-layer MLP, no state across steps.

    ReLU between the layers, as in the official code's `TokenRouter`.
    """

    def __init__(self, n_embd: int, hidden_dim: int, num_choices: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden_dim)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden_dim, num_choices)

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        return self.out(self.act(self.fc(x))), None


class LinearRouter(nn.Module):
    """One linear gate, the Mixtral-style MoE router used by the `moe` policies."""

    def __init__(self, n_embd: int, num_choices: int):
        super().__init__()
        self.out = nn.Linear(n_embd, num_choices, bias=False)

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        return self.out(x), None


def top_k_routing(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax in fp32, keep the top-k choices per token.

    Returns (weights (n, k) fp32, indices (n, k) long, probs (n, C) fp32). With
    `renormalize` the k kept weights are divided by their sum (the official MoM code and
    Mixtral do this); a SKIP choice, when kept, takes its share of that sum.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices, probs

"""Token routers for Mixture-of-Modules (design §2) and per-step MoE gates.

Every router maps a token's hidden state (and, for the GRU router, its router state from
the previous assembly step) to one logit per choice. `top_k_routing` turns logits into
the selected choices and their weights: softmax in at least fp32 (fp64 stays fp64;
optionally at a temperature), top-K, optional renormalisation; or the raw top-K logits
as weights.

All routers share one call signature, `router(x, state) -> (logits, new_state)`, so the
assembly code does not care which one it holds; stateless routers return `None` as state.

`RouterSlots` lets a pruned router compute its logits at the layout it had before
pruning, so that removing never-chosen modules leaves every output bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RouterSlots(nn.Module):
    """Where a pruned router's choices sit in the row of logits it had before pruning.

    BLAS and softmax kernels pick their blocking and summation order from the row width
    and from each value's position in the row, so a router whose output matmul merely
    lost some rows gives the kept choices logits that differ in the last bit (~1e-7).
    A pruned router therefore computes at the unpruned layout: each kept choice's weight
    row goes back to its original slot, empty slots get zero rows and a -inf logit. Same
    shapes, same positions: the kept choices' logits, probabilities and top-k are
    bit-identical to the unpruned router's whenever the removed choices had no
    probability mass left in fp32 (the case of modules that are never selected).

    slots: the slot of each choice, increasing; num_slots: the row width.
    """

    def __init__(self, slots: Sequence[int], num_slots: int):
        super().__init__()
        slots = [int(s) for s in slots]
        if not slots or any(b <= a for a, b in zip(slots, slots[1:])):
            raise ValueError(f"slots must be a non-empty increasing list, got {slots}")
        if slots[0] < 0 or slots[-1] >= num_slots:
            raise ValueError(f"slots {slots} must lie in [0, num_slots={num_slots})")
        self.slot_list, self.num_slots = slots, num_slots
        # Derived from the config, so not saved with the weights.
        self.register_buffer("slots", torch.empty(len(slots), dtype=torch.long), persistent=False)
        self.register_buffer(
            "choice_of_slot", torch.empty(num_slots, dtype=torch.long), persistent=False
        )
        self.register_buffer("empty", torch.empty(num_slots, dtype=torch.bool), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the index buffers (also after HF loading, which leaves them empty)."""
        device = self.slots.device
        slots = torch.tensor(self.slot_list, dtype=torch.long)
        choice_of_slot = torch.full((self.num_slots,), -1, dtype=torch.long)
        choice_of_slot[slots] = torch.arange(len(slots))
        with torch.no_grad():
            self.slots.copy_(slots.to(device))
            self.choice_of_slot.copy_(choice_of_slot.to(device))
            self.empty.copy_((choice_of_slot < 0).to(device))

    def extra_repr(self) -> str:
        return f"slots={self.slot_list}, num_slots={self.num_slots}"

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n, num_slots) logits of ``F.linear(x, weight, bias)``; -inf in empty slots."""
        full_weight = weight.new_zeros(self.num_slots, weight.shape[1])
        full_weight = full_weight.index_copy(0, self.slots, weight)
        full_bias = None
        if bias is not None:
            full_bias = bias.new_zeros(self.num_slots).index_copy(0, self.slots, bias)
        logits = F.linear(x, full_weight, full_bias)
        return logits.masked_fill(self.empty, float("-inf"))

    def choices(self, per_slot: torch.Tensor) -> torch.Tensor:
        """(..., num_slots) -> (..., num_choices): the columns of the choices."""
        return per_slot.index_select(-1, self.slots)

    def choice_index(self, slot_index: torch.Tensor) -> torch.Tensor:
        """Slot indices (e.g. top-k picks, never an empty slot) -> choice indices."""
        return self.choice_of_slot[slot_index]


def check_slot_lists(
    name: str, slot_lists: list[list[int]] | None, counts: list[int], widths: list[int]
) -> None:
    """Config validation of per-layer (or per-chunk) slot lists; messages name `name`.

    Entry i must hold `counts[i]` increasing slots in [0, widths[i]).
    """
    if slot_lists is None:
        return
    if len(slot_lists) != len(counts):
        raise ValueError(
            f"{name} has {len(slot_lists)} entries but there are {len(counts)} pools; give "
            "one list of slots per pool (pruning writes them, see modformer.surgery)"
        )
    for i, (slots, count, width) in enumerate(zip(slot_lists, counts, widths)):
        if len(slots) != count:
            raise ValueError(
                f"{name}[{i}] lists {len(slots)} slots but the pool has {count} modules"
            )
        if any(b <= a for a, b in zip(slots, slots[1:])) or slots[0] < 0 or slots[-1] >= width:
            raise ValueError(
                f"{name}[{i}]={slots} must be increasing slots in [0, {width}): the "
                "modules' original positions in the unpruned router"
            )


def output_logits(out: nn.Linear, x: torch.Tensor, slots: RouterSlots | None) -> torch.Tensor:
    """``out(x)``, at the unpruned layout when the router has `slots`."""
    return out(x) if slots is None else slots.linear(x, out.weight, out.bias)


class GRURouter(nn.Module):
    """MoM router (paper eqs. 7-8): `s_h = GRU(x_h, s_{h-1})`, `logits = W s_h`.

    The GRU runs over assembly steps (depth), not over time: each token carries its own
    state through the H steps of a chunk, starting from zero. Gate equations follow
    `torch.nn.GRUCell` (and the official code), written out so the two projections are
    plain `nn.Linear`s that the model's weight init covers:
        r = sigmoid(W_xr x + W_hr s),  z = sigmoid(W_xz x + W_hz s),
        n = tanh(W_xn x + r * (W_hn s)),  s' = (1 - z) * n + z * s.
    """

    def __init__(
        self, n_embd: int, state_dim: int, num_choices: int, slots: RouterSlots | None = None
    ):
        super().__init__()
        self.state_dim = state_dim
        self.x2h = nn.Linear(n_embd, 3 * state_dim)
        self.h2h = nn.Linear(state_dim, 3 * state_dim)
        self.out = nn.Linear(state_dim, num_choices)
        self.slots = slots

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
        return output_logits(self.out, state, self.slots), state


class MLPRouter(nn.Module):
    """Ablation router (paper appendix D.1): two-layer MLP, no state across steps.

    ReLU between the layers, as in the official code's `TokenRouter`.
    """

    def __init__(
        self, n_embd: int, hidden_dim: int, num_choices: int, slots: RouterSlots | None = None
    ):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden_dim)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden_dim, num_choices)
        self.slots = slots

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        return output_logits(self.out, self.act(self.fc(x)), self.slots), None


class LinearRouter(nn.Module):
    """One linear gate, the Mixtral-style MoE router used by the `moe` policies."""

    def __init__(self, n_embd: int, num_choices: int):
        super().__init__()
        self.out = nn.Linear(n_embd, num_choices, bias=False)

    def forward(self, x: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        return self.out(x), None


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routers compute softmax and top-k in at least fp32: bf16/fp16 -> fp32, fp64 stays."""
    return torch.promote_types(dtype, torch.float32)


def top_k_routing(
    logits: torch.Tensor,
    k: int,
    renormalize: bool = True,
    temperature: float = 1.0,
    output: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax in at least fp32 (`routing_dtype`; at `temperature`), keep the top-k choices
    per token.

    Returns (weights (n, k), indices (n, k) long, probs (n, C)), weights and probs in
    ``routing_dtype(logits.dtype)``, probs being ``softmax(logits / temperature)``. With
    `renormalize` the k kept weights are divided by their sum (the official MoM code and
    Mixtral do this); a SKIP choice, when kept, takes its share of that sum. Renormalised weights are computed as the softmax of the
    k kept (scaled) logits, which equals ``top-k probs / their sum`` but does not depend
    on the choices left out, so removing never-selected modules (pruning) cannot change
    them even in the last bit.
    `output="logits"` (the official MoM routers without softmax): the weights are the
    raw top-k logits themselves, unnormalised and possibly negative; `renormalize` and
    `temperature` must then be off (MoMConfig validates this).
    """
    if output not in ("softmax", "logits"):
        raise ValueError(f"output must be 'softmax' or 'logits', got {output!r}")
    logits = logits.to(routing_dtype(logits.dtype))
    scaled = logits / temperature  # exact when temperature == 1
    probs = torch.softmax(scaled, dim=-1)
    if output == "logits":
        if renormalize or temperature != 1.0:
            raise ValueError("raw-logit routing weights take neither renormalize nor temperature")
        weights, indices = torch.topk(logits, k, dim=-1)
        return weights, indices, probs
    if renormalize:
        kept_logits, indices = torch.topk(scaled, k, dim=-1)
        return torch.softmax(kept_logits, dim=-1), indices, probs
    weights, indices = torch.topk(probs, k, dim=-1)
    return weights, indices, probs

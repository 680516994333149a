"""Experts: E linear maps stacked as (E, d_in, d_out) tensors, applied to routed pairs.

A routing decision picks k experts per token. Every layer built from experts (ModuleFormer's
`SparseMoE` and `MixtureOfAttentionHeads`, MoM's module pools) does the same few things with
the picks: copy each token's row to its (token, pick) pairs, apply the picked expert's
weights to each pair row, and sum each token's pair rows weighted by the router. The layer
asks its `Experts` base for an `ExpertPairs` object (`route`) and does those steps through
it. Two backends implement them:

- ``"loop"``, the definition: pairs in (token, pick) order and, for each expert e,
  ``y = x @ W_e + b_e`` on the rows that picked e (`LoopPairs.linear`). It computes every
  row with every expert and keeps the rows of e with `torch.where`, so it costs E times the
  FLOPs of the grouped path, but it has no data-dependent shapes: no host syncs, and it
  compiles. MoM's per-module pre-LN is literally ``LN_e(x) @ W_e + b_e`` here.
- ``"grouped"``, the fast path (default): pairs sorted by expert (`make_dispatch`), one
  grouped GEMM over the per-expert segments (`grouped_linear`, a custom op torch.compile
  sees as one node), gathers in both directions (`nn/grouped.py`). Per-expert LayerNorm
  affines and biases are folded into the weights once per forward (`NormedLinear`).

The backend is the layer's `backend` (constructor argument, default ``"grouped"``);
``with experts_backend("loop"):`` switches every layer for the calls inside it. The
parameters stay attributes of the layer (`w_in`, `qkv_weight`, ...), so the state-dict
layout does not depend on the backend. Pairs whose expert index is negative or at least
E (SKIP, padding) pick no expert: their rows come out exactly zero in both backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modformer.nn.grouped import (
    Dispatch,
    combine_pairs,
    gather_pairs,
    grouped_linear,
    make_dispatch,
    pair_order,
    slot_order,
)

EXPERT_BACKENDS = ("grouped", "loop")

# Columns appended to the grouped backend's normalised input rows when a bias is folded
# into the weights: a 1 that carries the bias, then zeros so rows stay 16-byte aligned
# for grouped_mm.
BIAS_COLUMNS = 8

# Set by `experts_backend`; a plain global (not a ContextVar) so torch.compile reads it as a
# constant and guards on it.
_backend_override: str | None = None


def check_backend(name: str) -> str:
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"experts backend {name!r} is unknown; choose one of {EXPERT_BACKENDS}")
    return name


@contextmanager
def experts_backend(name: str) -> Iterator[None]:
    """Run every `Experts` layer with backend `name` inside the block (nestable)."""
    global _backend_override
    previous, _backend_override = _backend_override, check_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when autocast is on, else x's.

    nn.Linear is cast by autocast but grouped_mm is not; casting by hand keeps bf16
    training on the fast grouped path (fp32 has no grouped kernel on CUDA). Both backends
    cast the same way, so they compute in the same dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class NormedLinear:
    """The input side of experts with their own pre-LayerNorm: ``LN_e(x) @ W_e + b_e``.

    norm_weight, norm_bias: (E, d) LN affines (bias optional); weight: (E, d, f);
    bias: (E, f) or None. One object per forward: the grouped backend folds it once
    (`folded`) and reuses the folded weight for every routing decision of that forward.
    """

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    _folded: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def has_bias(self) -> bool:
        return self.bias is not None or self.norm_bias is not None

    def folded(self) -> torch.Tensor:
        """The grouped backend's form: ``LN_e(x) W_e + b_e = x_hat (g_e * W_e) + (beta_e W_e
        + b_e)`` with ``x_hat`` the normalisation (the same for every expert). The weight is
        (E, d + BIAS_COLUMNS, f), rows ``[g * W; beta W + b; 0...]``, when there is a bias
        to carry, else (E, d, f) ``g * W``."""
        if self._folded is None:
            scaled = self.norm_weight[:, :, None] * self.weight
            if not self.has_bias:
                self._folded = scaled
            else:
                w = self.weight
                bias = torch.zeros_like(w[:, 0]) if self.bias is None else self.bias
                if self.norm_bias is not None:
                    bias = bias + torch.bmm(self.norm_bias[:, None, :], w)[:, 0]
                padding = w.new_zeros(w.shape[0], BIAS_COLUMNS - 1, w.shape[2])
                self._folded = torch.cat([scaled, bias[:, None], padding], 1)
        return self._folded

    def normalized_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) -> x_hat, with the columns `[1, 0...]` appended when `folded` carries a
        bias (the 1 multiplies the folded bias row)."""
        x_hat = F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        if not self.has_bias:
            return x_hat
        ones = x_hat.new_ones(x_hat.shape[0], 1)
        return torch.cat([x_hat, ones, x_hat.new_zeros(x_hat.shape[0], BIAS_COLUMNS - 1)], 1)


class ExpertPairs(ABC):
    """One routing decision's (token, pick) pairs, laid out for one backend.

    index: (n, k) expert of each pick (>= num_experts or < 0: no expert);
    weight: (n, k) routing weights (at least fp32), or None for a decision that is only
    ever summed unweighted. Pair rows are (n * k, f) tensors in the backend's pair order.
    """

    def __init__(self, index: torch.Tensor, weight: torch.Tensor | None, num_experts: int):
        self.index = index
        self.weight = weight
        self.num_experts = num_experts
        self.k = index.shape[-1]

    @abstractmethod
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) token rows -> (n * k, d) pair rows: each pair gets its token's row."""

    @abstractmethod
    def slot_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Pair rows -> the same rows in (token, pick) order."""

    @abstractmethod
    def pair_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in (token, pick) order -> pair rows."""

    @abstractmethod
    def combine(self, rows: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        """(n * k, f) pair rows -> (n, f): ``y_t = sum_s r_ts row_ts`` (r = 1 unweighted)."""

    @abstractmethod
    def linear(
        self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n * k, d) pair rows -> (n * k, f): ``row @ W_e + b_e`` with e the pair's expert;
        weight (E, d, f), bias (E, f). Rows of pairs without an expert are 0."""

    def linear_sum(
        self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n * k, d) pair rows -> (n, f): ``y_t = sum_s r_ts (row_ts @ W_e + b_e)``."""
        return self.combine(self.linear(rows, weight, bias))

    @abstractmethod
    def normed_linear(self, x: torch.Tensor, normed: NormedLinear) -> torch.Tensor:
        """(n, d) token rows -> (n * k, f) pair rows ``LN_e(x_t) @ W_e + b_e``."""

    def expert_weights(self) -> torch.Tensor:
        """(n, E): each token's total routing weight per expert (0 where not picked)."""
        n, E = self.index.shape[0], self.num_experts
        index = torch.where((self.index >= 0) & (self.index < E), self.index, E)
        dense = self.weight.new_zeros(n, E + 1).scatter_add_(1, index, self.weight)
        return dense[:, :E]


class LoopPairs(ExpertPairs):
    """The definition: pairs in (token, pick) order, one masked matmul per expert."""

    def __init__(self, index: torch.Tensor, weight: torch.Tensor | None, num_experts: int):
        super().__init__(index, weight, num_experts)
        self.expert_of_pair = index.reshape(-1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.k, dim=0)

    def slot_order(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def pair_order(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def combine(self, rows: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        by_token = rows.view(-1, self.k, rows.shape[-1])
        if weighted:
            by_token = by_token * self.weight.to(rows.dtype)[:, :, None]
        return by_token.sum(1)

    def _picked(self, e: int) -> torch.Tensor:
        """(n * k, 1) bool: the pairs of expert e."""
        return (self.expert_of_pair == e)[:, None]

    def linear(self, rows, weight, bias=None):
        dtype = compute_dtype(rows)
        rows, weight = rows.to(dtype), weight.to(dtype)
        out = rows.new_zeros(rows.shape[0], weight.shape[2])
        for e in range(self.num_experts):
            y_e = rows @ weight[e]
            if bias is not None:
                y_e = y_e + bias[e].to(dtype)
            out = torch.where(self._picked(e), y_e, out)
        return out

    def normed_linear(self, x: torch.Tensor, normed: NormedLinear) -> torch.Tensor:
        dtype = compute_dtype(x)
        rows, d = self.gather(x), x.shape[-1]
        weight = normed.weight.to(dtype)
        out = rows.new_zeros(rows.shape[0], weight.shape[2], dtype=dtype)
        for e in range(self.num_experts):
            beta = None if normed.norm_bias is None else normed.norm_bias[e]
            ln_e = F.layer_norm(rows, (d,), normed.norm_weight[e], beta, normed.eps)
            y_e = ln_e.to(dtype) @ weight[e]
            if normed.bias is not None:
                y_e = y_e + normed.bias[e].to(dtype)
            out = torch.where(self._picked(e), y_e, out)
        return out


class GroupedPairs(ExpertPairs):
    """The fast path: pairs sorted by expert, one grouped GEMM per projection.

    complete: every pick has an expert (no SKIP, no padding), so the grouped GEMM has
    no left-out rows to zero.
    """

    def __init__(
        self,
        index: torch.Tensor,
        weight: torch.Tensor | None,
        num_experts: int,
        complete: bool = False,
    ):
        super().__init__(index, weight, num_experts)
        self.dispatch: Dispatch = make_dispatch(index, num_experts)
        self.complete = complete

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_pairs(x, self.dispatch)

    def slot_order(self, rows: torch.Tensor) -> torch.Tensor:
        return slot_order(rows, self.dispatch)

    def pair_order(self, rows: torch.Tensor) -> torch.Tensor:
        return pair_order(rows, self.dispatch)

    def combine(self, rows: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        return combine_pairs(rows, self.dispatch, self.weight if weighted else None)

    def linear(self, rows, weight, bias=None):
        dtype = compute_dtype(rows)
        return grouped_linear(
            rows.to(dtype),
            weight.to(dtype),
            self.dispatch.offsets,
            None if bias is None else bias.to(dtype),
            zero_left_out=not self.complete,
        )

    def linear_sum(self, rows, weight, bias=None):
        # The biases as one (n, E) x (E, f) matmul of routing weights, not one per pair row.
        out = self.combine(self.linear(rows, weight))
        if bias is not None:
            out = out + self.expert_weights().to(out.dtype) @ bias.to(out.dtype)
        return out

    def normed_linear(self, x: torch.Tensor, normed: NormedLinear) -> torch.Tensor:
        return self.linear(self.gather(normed.normalized_rows(x)), normed.folded())


class Experts(nn.Module):
    """Base of a layer of `num_experts` experts whose linear maps are stacked (E, d_in,
    d_out) parameters of the layer itself (so the state-dict keys are the layer's own).

    backend: ``"grouped"`` (default, the fast path) or ``"loop"`` (the definition);
    `experts_backend` overrides it for a block of calls.
    """

    def __init__(self, num_experts: int, backend: str = "grouped"):
        super().__init__()
        self.num_experts = num_experts
        self.backend = check_backend(backend)

    @property
    def active_backend(self) -> str:
        return _backend_override or self.backend

    def route(
        self,
        index: torch.Tensor,
        weight: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        all_picked: bool = False,
    ) -> ExpertPairs:
        """The pairs of picks `index` (n, k) with routing weights `weight` (n, k).

        token_mask: (n,) bools, False for padding tokens, which pick no expert at all
        (their pair rows are 0). Indices >= num_experts (SKIP) pick none either.
        all_picked: the caller knows every pick names an expert (a router's top-k and no
        padding), which saves the grouped backend a pass that zeroes left-out rows.
        """
        if token_mask is not None:
            index = index.masked_fill(~token_mask[:, None], self.num_experts)
            all_picked = False
        if self.active_backend == "loop":
            return LoopPairs(index, weight, self.num_experts)
        return GroupedPairs(index, weight, self.num_experts, complete=all_picked)

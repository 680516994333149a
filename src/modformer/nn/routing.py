"""Routing decisions: which choices of a pool each token runs, with what weights (design §6).

One vocabulary for every routed pool of both model families (the experts of a
ModuleFormer layer, the attention or FFN modules of a MoM chunk): a `RoutingDecision`
holds each token's k picks as indices into the pool, their weights and, for a learned
router, its distribution over the choices.

The SKIP rule lives here and nowhere else: the index equal to the pool size
(``num_choices``) runs no module. When the pool offers SKIP as a choice (``has_skip``,
MoM) that index is SKIP and counts as the last column of the pool's usage; otherwise it
only marks picks that are left out (padding tokens in a dispatch, `without_tokens`).

Nothing here reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class RoutingDecision:
    """The picks of one routed decision for a batch of tokens.

    indices: (*tokens, k) long pool indices; ``num_choices`` means "no module" (SKIP).
    weights: (*tokens, k) the weights of the picks (r_k, g(m|x)), in at least fp32.
    num_choices: the pool size N (modules or experts a pick can run).
    has_skip: whether SKIP is one of the router's choices (then index N is SKIP).
    probs: (*tokens, C) the router's full distribution (auxiliary losses, loads), or None
        for a fixed rule. C is N (+1 with SKIP) unless the router scores its own choice
        space (``router_indices``).
    logits: (*tokens, C) the router's logits, when the losses need them (ModuleFormer).
    router_indices: (*tokens, k) the picks in the router's own choice space where it
        differs from the pool's (MoM's per-step MoE routers pick among E experts of a
        larger pool; chunk-wide routers score N choices over a smaller pool).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    num_choices: int
    has_skip: bool = False
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router_indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices.shape != self.weights.shape:
            raise ValueError(
                f"indices {tuple(self.indices.shape)} and weights {tuple(self.weights.shape)} "
                "must have the same shape (*tokens, k)"
            )
        if self.num_choices < 1:
            raise ValueError(f"num_choices must be >= 1, got {self.num_choices}")

    # ---- the SKIP rule -------------------------------------------------------------------

    @property
    def skip_index(self) -> int | None:
        """The index that means SKIP (the pool size), or None when SKIP is no choice."""
        return self.num_choices if self.has_skip else None

    @property
    def num_columns(self) -> int:
        """Width of `counts`: the pool's choices, plus SKIP last when it is one."""
        return self.num_choices + int(self.has_skip)

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    @property
    def router_picks(self) -> torch.Tensor:
        """The picks as columns of ``probs`` (``router_indices`` where set)."""
        return self.indices if self.router_indices is None else self.router_indices

    def picks_module(self) -> torch.Tensor:
        """(*tokens, k) bool: the pick runs a module (it is not SKIP)."""
        return self.indices < self.num_choices

    def modules_run_per_token(self) -> torch.Tensor:
        """(*tokens,) long: how many modules each token runs in this decision."""
        return self.picks_module().sum(-1)

    def runs_any_module(self) -> torch.Tensor:
        """(*tokens,) bool: False for tokens whose picks are all SKIP."""
        return self.picks_module().any(-1)

    def without_tokens(self, token_mask: torch.Tensor) -> torch.Tensor:
        """The indices with every pick of the tokens where ``token_mask`` is False (padding)
        set to "no module": a dispatch then leaves those pairs out."""
        return self.indices.masked_fill(~token_mask[..., None], self.num_choices)

    def counts(self, token_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(num_columns,) int64: how often each choice was picked, SKIP last.

        token_weight: (*tokens,) integer weights (1 = real token, 0 = padding); every
        token counts once when None. One ``scatter_add_``, no host sync.
        """
        flat = self.indices.reshape(-1)
        if token_weight is None:
            per_pick = torch.ones_like(flat)
        else:
            per_pick = token_weight.to(torch.int64)[..., None].expand_as(self.indices).reshape(-1)
        out = torch.zeros(self.num_columns, dtype=torch.int64, device=flat.device)
        return out.scatter_add_(0, flat, per_pick)

    # ---- shapes --------------------------------------------------------------------------

    def _map(self, fn) -> RoutingDecision:
        """The decision with `fn` applied to every per-token tensor."""
        return replace(
            self,
            **{
                name: None if value is None else fn(value)
                for name, value in (
                    ("indices", self.indices),
                    ("weights", self.weights),
                    ("probs", self.probs),
                    ("logits", self.logits),
                    ("router_indices", self.router_indices),
                )
            },
        )

    def view_tokens(self, *shape: int) -> RoutingDecision:
        """The same decision with its token dimensions viewed as `shape` (e.g. (B, T))."""
        return self._map(lambda t: t.reshape(*shape, t.shape[-1]))

    def flat(self) -> RoutingDecision:
        """The same decision with one token dimension: (n, k) picks, (n, C) probs."""
        return self._map(lambda t: t.reshape(-1, t.shape[-1]))

    def detach(self) -> RoutingDecision:
        """A copy that holds no autograd graph (for a recorded trace)."""
        return self._map(torch.Tensor.detach)

"""Assembly policies: who decides which modules a token runs at each step (design §2).

A policy answers two questions per assembly step h of a chunk: which attention modules
(and weights) each token uses on `x_h`, and which FFN modules on `u_h`. The learned
policy asks the MoM routers; the fixed policies of the paper's sec. 3.5 (vanilla,
layer-skip, early exit, parameter sharing, MoE, MoE-share) follow a rule. All of them
feed the same assembly code in `modeling_mom.py`, which is what makes them special cases
of MoM.

Every decision is a `RoutingDecision` (`modformer.nn.routing`): indices into the chunk's
module pool, where the index equal to the pool size is SKIP (the identity: the pair is
left out of every grouped GEMM).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from modformer.models.mom.configuration_mom import MoMConfig
from modformer.nn.routers import GRURouter, LinearRouter, MLPRouter, RouterSlots, top_k_routing
from modformer.nn.routing import RoutingDecision

# criterion(layer, hidden) -> (n,) bool, True = skip: `layer` is the assembled layer
# number, `hidden` the (n, n_embd) residual stream entering that layer's attention.
SkipCriterion = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class PolicyState:
    """What a policy carries from step to step within one chunk's forward.

    `carry` is shared by all chunks of one forward pass (early exit keeps its per-token
    "has exited" flags there, so an exit holds for later chunks too).
    """

    carry: dict = field(default_factory=dict)
    attn_router_state: torch.Tensor | None = None
    ffn_router_state: torch.Tensor | None = None
    step_skipped: torch.Tensor | bool = False  # layer-skip decision of the current step


def fixed_decision(
    x: torch.Tensor, module: int, num_modules: int, has_skip: bool = False
) -> RoutingDecision:
    """Every token runs `module` with weight 1 (a module index, or `num_modules`: SKIP)."""
    n = x.shape[0]
    return RoutingDecision(
        indices=torch.full((n, 1), module, dtype=torch.long, device=x.device),
        weights=torch.ones(n, 1, dtype=torch.float32, device=x.device),
        num_choices=num_modules,
        has_skip=has_skip,
    )


def module_or_skip(
    x: torch.Tensor, module: int, num_modules: int, skipped: torch.Tensor | bool
) -> RoutingDecision:
    """Module `module`, or SKIP where `skipped` ((n,) bool tensor, or a Python bool)."""
    if isinstance(skipped, bool):
        return fixed_decision(x, num_modules if skipped else module, num_modules, has_skip=True)
    index = torch.where(skipped, num_modules, module).to(torch.long)[:, None]
    weight = torch.ones(index.shape, dtype=torch.float32, device=x.device)
    return RoutingDecision(index, weight, num_modules, has_skip=True)


class AssemblyPolicy(nn.Module, ABC):
    """Base class. `num_attn_modules` / `num_ffn_modules` are the pool sizes the choices
    index; `routed` says whether choices come from routers (then `RoutingDecision.probs` is
    set).
    """

    routed = False

    def __init__(self, num_attn_modules: int, num_ffn_modules: int, first_layer: int):
        super().__init__()
        self.num_attn_modules = num_attn_modules
        self.num_ffn_modules = num_ffn_modules
        self.first_layer = first_layer

    def begin(self, carry: dict) -> PolicyState:
        return PolicyState(carry=carry)

    @abstractmethod
    def attention(self, step: int, x: torch.Tensor, state: PolicyState) -> RoutingDecision:
        """Attention modules of step `step` for the (n, n_embd) rows `x` (= x_h)."""

    @abstractmethod
    def ffn(self, step: int, u: torch.Tensor, state: PolicyState) -> RoutingDecision:
        """FFN modules of step `step` for the (n, n_embd) rows `u` (= u_h)."""


class LearnedPolicy(AssemblyPolicy):
    """MoM routing: R^A on x_h, R^F on u_h, top-K over N modules (+ SKIP), per chunk.

    The GRU states start at zero in `begin`, i.e. at every chunk. A pruned chunk has
    fewer attention or FFN modules than N (`MoMConfig.learned_pool_sizes`), and its
    routers compute at the unpruned layout (`MoMConfig.learned_pool_slots`).
    """

    routed = True

    def __init__(
        self,
        config: MoMConfig,
        num_attn_modules: int,
        num_ffn_modules: int,
        first_layer: int,
        chunk_size: int,
        slots: tuple[list[int] | None, list[int] | None] = (None, None),
    ):
        """chunk_size: the unpruned pool size N; slots: the kept modules' indices in it."""
        super().__init__(num_attn_modules, num_ffn_modules, first_layer)
        extra = 1 if config.skip else 0
        router_cls = GRURouter if config.router == "gru" else MLPRouter
        # router_width="chunk": both routers score the chunk's N choices (+ SKIP); picks at
        # or above a smaller pool's size run no module (they become its SKIP index).
        self.chunk_wide = config.router_width == "chunk"
        routers = []
        for num_modules, kept in zip((num_attn_modules, num_ffn_modules), slots):
            if self.chunk_wide:
                num_modules = chunk_size
            router_slots = None
            if kept is not None:
                # SKIP keeps the last slot, after the chunk's unpruned pool.
                skip_slot = [chunk_size] if config.skip else []
                router_slots = RouterSlots(kept + skip_slot, chunk_size + extra)
            routers.append(
                router_cls(config.n_embd, config.router_dim, num_modules + extra, router_slots)
            )
        self.attn_router, self.ffn_router = routers
        self.attn_k, self.ffn_k = config.attn_k, config.ffn_k
        self.skip = config.skip
        self.renormalize = config.renormalize
        self.temperature = config.router_temperature
        self.output = config.router_output

    def _route(
        self, router: nn.Module, x: torch.Tensor, state: torch.Tensor | None, num_modules: int,
        k: int,
    ):  # fmt: skip
        logits, state = router(x, state)
        weight, index, probs = top_k_routing(
            logits, k, self.renormalize, self.temperature, self.output
        )
        if router.slots is not None:
            index, probs = router.slots.choice_index(index), router.slots.choices(probs)
        skip = self.skip
        if self.chunk_wide:
            pool_index = index.clamp(max=num_modules)  # no module there: the pool's SKIP
            return RoutingDecision(pool_index, weight, num_modules, skip, probs, None, index), state
        return RoutingDecision(index, weight, num_modules, skip, probs), state

    def attention(self, step: int, x: torch.Tensor, state: PolicyState) -> RoutingDecision:
        selection, state.attn_router_state = self._route(
            self.attn_router, x, state.attn_router_state, self.num_attn_modules, self.attn_k
        )
        return selection

    def ffn(self, step: int, u: torch.Tensor, state: PolicyState) -> RoutingDecision:
        selection, state.ffn_router_state = self._route(
            self.ffn_router, u, state.ffn_router_state, self.num_ffn_modules, self.ffn_k
        )
        return selection


class VanillaPolicy(AssemblyPolicy):
    """Step h uses module h with weight 1: the chunk is the vanilla stack of its layers."""

    def __init__(self, num_modules: int, first_layer: int):
        super().__init__(num_modules, num_modules, first_layer)

    def attention(self, step: int, x: torch.Tensor, state: PolicyState) -> RoutingDecision:
        return fixed_decision(x, step, self.num_attn_modules)

    def ffn(self, step: int, u: torch.Tensor, state: PolicyState) -> RoutingDecision:
        return fixed_decision(u, step, self.num_ffn_modules)


class LayerSkipPolicy(AssemblyPolicy):
    """Eq. 9: step h runs module h, or SKIP for both attention and FFN.

    A step is skipped for all tokens when its layer is in `skip_layers`, and per token
    where the runtime `criterion` (if set) says so.
    """

    def __init__(self, num_modules: int, first_layer: int, skip_layers: list[int] | None):
        super().__init__(num_modules, num_modules, first_layer)
        self.skip_layers = set(skip_layers or [])
        self.criterion: SkipCriterion | None = None

    def decide(self, step: int, x: torch.Tensor, state: PolicyState) -> torch.Tensor | bool:
        """This step's skip flags: a Python bool, or an (n,) bool tensor."""
        layer = self.first_layer + step
        skipped = layer in self.skip_layers
        if self.criterion is not None and not skipped:
            skipped = self.criterion(layer, x).reshape(-1).to(torch.bool)
        return skipped

    def attention(self, step: int, x: torch.Tensor, state: PolicyState) -> RoutingDecision:
        state.step_skipped = self.decide(step, x, state)
        return module_or_skip(x, step, self.num_attn_modules, state.step_skipped)

    def ffn(self, step: int, u: torch.Tensor, state: PolicyState) -> RoutingDecision:
        return module_or_skip(u, step, self.num_ffn_modules, state.step_skipped)


class EarlyExitPolicy(LayerSkipPolicy):
    """Layer skip where a token that skips once skips every later chunk step.

    With a static `skip_layers` list the exit happens at the first listed layer.
    """

    def decide(self, step: int, x: torch.Tensor, state: PolicyState) -> torch.Tensor | bool:
        now = super().decide(step, x, state)
        if self.skip_layers and self.first_layer + step >= min(self.skip_layers):
            now = True
        state.carry["exited"] = _logical_or(state.carry.get("exited", False), now)
        return state.carry["exited"]


def _logical_or(a: torch.Tensor | bool, b: torch.Tensor | bool) -> torch.Tensor | bool:
    """`a | b` for flags that are Python bools or (n,) bool tensors."""
    if a is True or b is True:
        return True
    if a is False:
        return b
    if b is False:
        return a
    return a | b


class ParameterSharingPolicy(AssemblyPolicy):
    """Eq. 10: step h uses module share_map[h] (attention and FFN)."""

    def __init__(self, num_modules: int, first_layer: int, share_map: list[int]):
        super().__init__(num_modules, num_modules, first_layer)
        self.share_map = list(share_map)

    def attention(self, step: int, x: torch.Tensor, state: PolicyState) -> RoutingDecision:
        return fixed_decision(x, self.share_map[step], self.num_attn_modules)

    def ffn(self, step: int, u: torch.Tensor, state: PolicyState) -> RoutingDecision:
        return fixed_decision(u, self.share_map[step], self.num_ffn_modules)


class MoEPolicy(AssemblyPolicy):
    """Eq. 11: attention step h runs module h; the FFN is top-K over E experts.

    `shared=False` (MoE): step h routes among experts h*E .. h*E+E-1 of an H*E pool.
    `shared=True` (MoE-share): every step routes among the same E experts.
    Each step has its own linear router (softmax in at least fp32, top-K, renormalised when
    `config.renormalize`, as Mixtral does; `router_temperature` and `router_output`
    apply as to the learned routers).
    """

    routed = True

    def __init__(self, config: MoMConfig, num_modules: int, first_layer: int, shared: bool):
        self.num_experts = config.num_experts if config.num_experts is not None else num_modules
        pool = self.num_experts if shared else config.H * self.num_experts
        super().__init__(num_modules, pool, first_layer)
        self.shared = shared
        self.k = config.K
        self.renormalize = config.renormalize
        self.temperature = config.router_temperature
        self.output = config.router_output
        self.routers = nn.ModuleList(
            LinearRouter(config.n_embd, self.num_experts) for _ in range(config.H)
        )

    def attention(self, step: int, x: torch.Tensor, state: PolicyState) -> RoutingDecision:
        return fixed_decision(x, step, self.num_attn_modules)

    def ffn(self, step: int, u: torch.Tensor, state: PolicyState) -> RoutingDecision:
        logits, _ = self.routers[step](u)
        weight, expert, probs = top_k_routing(
            logits, self.k, self.renormalize, self.temperature, self.output
        )
        index = expert if self.shared else expert + step * self.num_experts
        return RoutingDecision(
            index, weight, self.num_ffn_modules, probs=probs, router_indices=expert
        )


def build_policy(
    config: MoMConfig, num_modules: int, first_layer: int, chunk_index: int = 0
) -> AssemblyPolicy:
    """The policy of chunk `chunk_index` of `num_modules` modules whose first step is
    `first_layer`."""
    if config.policy == "learned":
        num_attn, num_ffn = config.learned_pool_sizes(chunk_index, num_modules)
        slots = config.learned_pool_slots(chunk_index)
        return LearnedPolicy(config, num_attn, num_ffn, first_layer, num_modules, slots)
    if config.policy == "vanilla":
        return VanillaPolicy(num_modules, first_layer)
    if config.policy == "layer_skip":
        return LayerSkipPolicy(num_modules, first_layer, config.skip_layers)
    if config.policy == "early_exit":
        return EarlyExitPolicy(num_modules, first_layer, config.skip_layers)
    if config.policy == "parameter_sharing":
        return ParameterSharingPolicy(num_modules, first_layer, config.share_map)
    if config.policy in ("moe", "moe_share"):
        return MoEPolicy(config, num_modules, first_layer, shared=config.policy == "moe_share")
    raise ValueError(f"policy {config.policy!r} is unknown")  # config validation catches it

"""Mixture-of-Modules as a Hugging Face `PreTrainedModel` (design §2).

Read top to bottom:

- `AttentionModulePool` / `FFNModulePool` (`module_pools.py`): the modules of one chunk,
  each with its own pre-LN, stored stacked as (num_modules, d_in, d_out) tensors and run
  on a decision's (token, pick) pairs by an `Experts` backend (`nn/experts.py`): the
  per-module loop that is the definition, or the grouped GEMMs of the fast path. SKIP
  picks select no module and add exactly zero.
- `MoMChunk`: H assembly steps, `u_h = F^A_h(x_h) + x_h`, `x_{h+1} = F^F_h(u_h) + u_h`,
  with the modules each token runs chosen by the chunk's policy (`policies.py`).
- `MoMModel`: embeddings, then fixed GPT-2 `Block`s and chunks in chunk-string order,
  then the final LN. `MoMForCausalLM` adds the tied LM head, the loss and `generate()`.

Attention assembly (eq. 5): q/k/v of a token are the sums over its picked modules of
`LN_k(x) W_k` (times r_k when `weighted_qkv`), heads attend causally, and the output is
`sum_k r_k * a W^O_k`. A token whose picks are all SKIP gets no output at that step, and
by default (`all_skip_tokens="drop"`) is no key either: it is masked out of the keys
(boolean SDPA mask). With `all_skip_tokens="zero_key"` (the official code) it stays in the
keys: its q/k/v rows are exactly zero (SKIP pairs select no module), so
it is a zero key with a zero value and no mask is needed.

KV cache: every assembled attention layer has its own cache layer, numbered in order
over fixed blocks and chunk steps (`layer`). When a token may skip a whole attention step
(K=1 with SKIP, layer-skip, early exit) and is then dropped, the "is a key" flags of each chunk step live in
extra cache layers after those (shape (B, 1, T, 1)), so beam reordering and cropping keep
them aligned with the keys. `config.num_hidden_layers` counts both kinds.

Routing trace: `model(..., return_routing=True)` returns `routing`, a tuple with one
`RoutingStep` per chunk step in execution order (fixed blocks are not listed: every
token runs their one attention and one FFN): where the step is, and its attention and
FFN `RoutingDecision`s. Nothing is kept when it is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from modformer.models.checkpointing import CheckpointingMixin, no_cache_when_checkpointing
from modformer.models.classification import SequenceClassificationMixin
from modformer.models.export_code import PortableModelMixin
from modformer.models.flops import FlopCounting
from modformer.models.gpt.modeling_gpt import Block
from modformer.models.mom.configuration_mom import MoMConfig
from modformer.models.mom.flops import mom_cache_memory, mom_flops
from modformer.models.mom.module_pools import AttentionModulePool, FFNModulePool, ModulePool
from modformer.models.mom.policies import AssemblyPolicy, SkipCriterion, build_policy
from modformer.models.mom.routing import MoMRouting
from modformer.models.outputs import (
    ModformerCausalLMOutput,
    cache_field,
    causal_lm_loss,
    keep_positions,
    output_cache,
    resolve_cache,
)
from modformer.nn.experts import ExpertPairs
from modformer.nn.masking import causal_padding_mask
from modformer.nn.moe_losses import expert_load, switch_balance
from modformer.nn.routers import RouterSlots
from modformer.nn.routing import RoutingDecision

# ---- outputs ---------------------------------------------------------------------------


@dataclass
class RoutingStep:
    """Where one chunk step is, and its two decisions. B, T: batch and tokens of the call.

    attn / ffn: the step's decisions with (B, T, k) indices and weights (detached); the
    index equal to `RoutingDecision.num_choices` (the pool size) runs no module (SKIP,
    and with `router_width="chunk"` also a choice beyond the pool). For the `moe` policy
    FFN indices count over the H * E pool (expert e of step h is h * E + e).
    """

    chunk: int
    step: int
    layer: int
    attn: RoutingDecision
    ffn: RoutingDecision


@dataclass
class MoMModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None
    aux_metrics: dict[str, torch.Tensor] | None = None
    routing: tuple[RoutingStep, ...] | None = None


@dataclass
class MoMCausalLMOutput(ModformerCausalLMOutput):
    routing: tuple[RoutingStep, ...] | None = None


# ---- per-forward state -----------------------------------------------------------------


class AttentionMasks:
    """Boolean SDPA masks (True = may attend) of one forward pass.

    `base` is causal + padding (None when SDPA's own causal path suffices).
    `restricted_to_keys` additionally drops keys that were all-SKIP at a step; each query
    may still attend to itself, so no row is empty (an all-SKIP query's output is never
    used: it has no W_O module to go through).
    """

    def __init__(
        self, attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
    ):
        self.base = causal_padding_mask(attention_mask, q_len, past_len, device)
        q_pos = torch.arange(past_len, past_len + q_len, device=device)
        k_pos = torch.arange(past_len + q_len, device=device)
        self._q_pos, self._k_pos = q_pos, k_pos

    def restricted_to_keys(self, is_key: torch.Tensor) -> torch.Tensor:
        """is_key: (B, S) bool over all S = past + current positions -> (B, 1, T, S)."""
        q, k = self._q_pos[:, None], self._k_pos[None, :]
        causal = self.base if self.base is not None else (k <= q)[None, None]
        return (causal & is_key[:, None, None, :]) | (k == q)[None, None]


@dataclass(frozen=True)
class ForwardContext:
    """What every layer of one forward pass reads (and never writes: a layer recomputed
    under activation checkpointing must see exactly what it saw the first time)."""

    masks: AttentionMasks
    token_weight: torch.Tensor | None  # (n,) 1.0 for real tokens, 0.0 for padding
    compute_aux: bool
    balance_loss: bool
    record_routing: bool


@dataclass
class ChunkTrace:
    """What one chunk call reports besides its output. It is returned, not appended to
    shared state, so a recomputation (activation checkpointing) cannot count it twice.

    carry: the policy state handed to the next chunk (early exit's "has exited" flags).
    balance_terms: Switch balance terms of the routed decisions; loads: module loads by
    metric name; routing: the chunk's steps of the routing trace (when recorded).
    """

    carry: dict
    balance_terms: list[torch.Tensor] = field(default_factory=list)
    loads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    routing: list[RoutingStep] = field(default_factory=list)

    def observe(self, name: str, decision: RoutingDecision, ctx: ForwardContext) -> None:
        """Module load (fraction of picks per choice) and the Switch balance term of a
        routed decision; no host syncs."""
        picks, probs = decision.router_picks, decision.probs
        load = expert_load(picks, probs.shape[-1], ctx.token_weight) / decision.top_k
        self.loads.setdefault(name, []).append(load.detach())
        if ctx.balance_loss:
            self.balance_terms.append(switch_balance(probs, picks, ctx.token_weight))


# ---- chunk -----------------------------------------------------------------------------


class MoMChunk(GradientCheckpointingLayer):
    """One chunk: N attention and N FFN modules (or the policy's pool sizes) assembled
    for H steps. `first_layer` numbers its first step among all assembled layers.

    A pure function of its arguments (see `ChunkTrace`), so it can be recomputed under
    activation checkpointing; the KV cache is the keyword `cache`, which HF's
    checkpointing wrapper drops.
    """

    def __init__(
        self,
        config: MoMConfig,
        num_modules: int,
        chunk_index: int,
        first_layer: int,
        key_flag_layer: int | None,
    ):
        super().__init__()
        self.chunk_index = chunk_index
        self.num_modules = num_modules
        self.steps = config.H
        self.first_layer = first_layer
        self.key_flag_layer = key_flag_layer
        # All-SKIP tokens stay in the keys as zero keys (the official MoM code's choice).
        self.zero_keys = config.all_skip_tokens == "zero_key"
        self.policy: AssemblyPolicy = build_policy(config, num_modules, first_layer, chunk_index)
        # MoM-same: one stored module per type that every router pick uses.
        self.tied = config.mom_same
        self.attn = AttentionModulePool(config, 1 if self.tied else self.policy.num_attn_modules)
        self.ffn = FFNModulePool(config, 1 if self.tied else self.policy.num_ffn_modules)

    def _pairs(self, decision: RoutingDecision, pool: ModulePool) -> ExpertPairs:
        index = decision.indices
        if self.tied:  # every module pick -> stored module 0, SKIP -> 1 (= the pool size)
            index = (~decision.picks_module()).long()
        return pool.route(index, decision.weights)

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        carry: dict,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, ChunkTrace]:
        """x: (B, T, d); carry: the previous chunk's `ChunkTrace.carry` (not modified)."""
        B, T, d = x.shape
        policy = self.policy
        trace = ChunkTrace(carry=dict(carry))
        state = policy.begin(trace.carry)
        observe = policy.routed and ctx.compute_aux
        prefix = f"mom/chunk{self.chunk_index}"
        qkv, fc = self.attn.qkv_projection(), self.ffn.fc_projection()
        for h in range(self.steps):
            attn_route = policy.attention(h, x.reshape(B * T, d), state)
            is_key = None
            if self.key_flag_layer is not None:
                is_key = attn_route.runs_any_module().view(B, T)
            x = x + self.attn(
                x,
                self._pairs(attn_route, self.attn),
                qkv,
                ctx.masks,
                cache,
                self.first_layer + h,
                is_key,
                None if self.key_flag_layer is None else self.key_flag_layer + h,
            )
            ffn_route = policy.ffn(h, x.reshape(B * T, d), state)
            x = x + self.ffn(x, self._pairs(ffn_route, self.ffn), fc)

            if observe:
                if attn_route.probs is not None:
                    trace.observe(f"{prefix}/attn_load", attn_route, ctx)
                if ffn_route.probs is not None:
                    trace.observe(f"{prefix}/ffn_load", ffn_route, ctx)
            if ctx.record_routing:
                trace.routing.append(
                    RoutingStep(
                        chunk=self.chunk_index,
                        step=h,
                        layer=self.first_layer + h,
                        attn=attn_route.detach().view_tokens(B, T),
                        ffn=ffn_route.detach().view_tokens(B, T),
                    )
                )
        return x, trace


# ---- models ----------------------------------------------------------------------------


class MoMPreTrainedModel(CheckpointingMixin, PortableModelMixin, PreTrainedModel):
    config_class = MoMConfig
    config: MoMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block", "MoMChunk"]
    _supports_sdpa = True
    _supports_cache_class = True

    @classmethod
    def auto_classes(cls) -> dict[str, type]:
        return {
            "AutoModel": MoMModel,
            "AutoModelForCausalLM": MoMForCausalLM,
            "AutoModelForSequenceClassification": MoMForSequenceClassification,
        }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * L), with L the
        number of layers of the equivalent vanilla model; routers get HF's Linear init.

        HF skips modules without parameters of their own when it initialises custom-code
        models, so the fixed blocks' residual projections are recognised by a flag that
        `MoMModel` sets on them rather than through their parent module.
        """
        super()._init_weights(module)
        if isinstance(module, RouterSlots):
            module.reset_buffers()
            return
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_vanilla_layers)
        if isinstance(module, nn.Linear) and getattr(module, "is_residual_projection", False):
            init.normal_(module.weight, mean=0.0, std=resid_std)
        elif isinstance(module, ModulePool):
            module.reset_parameters(std, resid_std)


class MoMModel(MoMPreTrainedModel):
    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        layers: list[nn.Module] = []
        layer, chunk_index = 0, 0
        key_flag_layer = config.num_attention_layers  # flag layers follow the attention ones
        for size in config.chunk_sizes:
            if size == 1:
                block = Block(config, layer)
                block.attn.c_proj.is_residual_projection = True
                block.mlp.c_proj.is_residual_projection = True
                layers.append(block)
                layer += 1
                continue
            flags = key_flag_layer if config.attention_may_skip_all else None
            layers.append(MoMChunk(config, size, chunk_index, layer, flags))
            layer += config.H
            chunk_index += 1
            if flags is not None:
                key_flag_layer += config.H
        self.h = nn.ModuleList(layers)
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    @property
    def chunks(self) -> list[MoMChunk]:
        return [m for m in self.h if isinstance(m, MoMChunk)]

    def set_skip_criterion(self, criterion: SkipCriterion | None) -> None:
        """Per-token skip rule of the layer_skip / early_exit policies (not saved).

        `criterion(layer, hidden)` gets the assembled layer number and the (n, n_embd)
        residual stream entering that layer's attention and returns (n,) bool, True =
        skip (attention and FFN of that step).
        """
        if self.config.policy not in ("layer_skip", "early_exit"):
            raise ValueError(
                f"a skip criterion needs policy 'layer_skip' or 'early_exit', "
                f"not {self.config.policy!r}"
            )
        for chunk in self.chunks:
            chunk.policy.criterion = criterion

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_routing: bool = False,
        compute_aux: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoMModelOutput:
        """`use_cache` defaults to config.use_cache outside training (a training forward
        needs no cache). `compute_aux` computes the balance loss (when its weight is > 0)
        and puts module loads into `aux_metrics` (the causal-LM model sets it with labels)."""
        past_key_values = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        use_cache, past_key_values = no_cache_when_checkpointing(self, use_cache, past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if use_cache else None
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if past_len + T > self.config.n_positions:
                raise ValueError(
                    f"sequence of {past_len + T} tokens exceeds n_positions="
                    f"{self.config.n_positions}; shorten the input or use a larger n_positions"
                )
            position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device)[None]

        x = self.drop(inputs_embeds + self.wpe(position_ids))
        masks = AttentionMasks(attention_mask, T, past_len, x.device)
        token_weight = None
        if attention_mask is not None:
            token_weight = attention_mask[:, -T:].reshape(-1).to(torch.float32)
        ctx = ForwardContext(
            masks=masks,
            token_weight=token_weight,
            compute_aux=compute_aux,
            balance_loss=compute_aux and self.config.balance_loss_weight > 0,
            record_routing=return_routing,
        )
        carry: dict = {}  # policy state shared by the chunks (early exit's flags)
        balance_terms: list[torch.Tensor] = []
        loads: dict[str, list[torch.Tensor]] = {}
        routing: list[RoutingStep] = []
        for layer in self.h:
            if isinstance(layer, MoMChunk):
                x, trace = layer(x, ctx, carry, cache=cache)
                carry = trace.carry
                balance_terms += trace.balance_terms
                for name, values in trace.loads.items():
                    loads.setdefault(name, []).extend(values)
                routing += trace.routing
            else:
                x = layer(x, masks.base, cache=cache)
        x = self.ln_f(x)

        aux_loss = None
        if balance_terms:
            aux_loss = self.config.balance_loss_weight * torch.stack(balance_terms).mean()
        aux_metrics = {name: torch.stack(v).mean(0) for name, v in loads.items()} or None
        if aux_metrics is not None and aux_loss is not None:
            aux_metrics["mom/balance_loss"] = aux_loss.detach()
        return MoMModelOutput(
            last_hidden_state=x,
            **cache_field(cache),
            aux_loss=aux_loss,
            aux_metrics=aux_metrics,
            routing=tuple(routing) if return_routing else None,
        )


class MoMForCausalLM(FlopCounting, MoMRouting, MoMPreTrainedModel, GenerationMixin):
    flop_counter = staticmethod(mom_flops)
    cache_memory_formula = staticmethod(mom_cache_memory)
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MoMConfig):
        super().__init__(config)
        self.transformer = MoMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def set_skip_criterion(self, criterion: SkipCriterion | None) -> None:
        """See `MoMModel.set_skip_criterion`."""
        self.transformer.set_skip_criterion(criterion)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_routing: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoMCausalLMOutput:
        """With `labels`: `loss` = lm_loss + balance loss (when balance_loss_weight > 0),
        and `aux_metrics` holds each chunk's module loads (`mom/chunk{c}/attn_load`,
        `.../ffn_load`: fraction of picks per choice, SKIP last, averaged over steps)."""
        past_key_values = resolve_cache(cache, past_key_values)
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_routing=return_routing,
            compute_aux=labels is not None,
        )
        hidden = out.last_hidden_state
        hidden = keep_positions(hidden, logits_to_keep)
        logits = self.lm_head(hidden)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss if out.aux_loss is None else lm_loss + out.aux_loss
        return MoMCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            aux_metrics=out.aux_metrics,
            logits=logits,
            **cache_field(output_cache(out)),
            routing=out.routing,
        )


class MoMForSequenceClassification(SequenceClassificationMixin, MoMPreTrainedModel):
    """`MoMModel` with a `score` head on the last real token (models/classification.py)."""

    base_model_class = MoMModel

"""ModuleFormer as a Hugging Face `PreTrainedModel` (design §3).

Read top to bottom: `ModuleFormerMemory` is the Transformer-XL history, `ModuleFormerBlock`
one layer (`x + MoA(LN(x))`, then `x + SMoE(LN(x))`), `ModuleFormerModel` the stack
(token embeddings only: stick-breaking attention needs no positions; the softmax_rope
option rotates queries and keys by positions counted from the attention mask), and
`ModuleFormerForCausalLM` adds the LM head, the auxiliary routing losses and
`generate()` support.

Keys/values. Every layer has one set of keys/values shared by its attention experts, so a
KV cache (a HF `DynamicCache`, one cache layer per block) holds exactly what a dense model
of ``n_head`` heads of size ``att_hidden / n_head`` would. A decoding step computes the
new token's k routed queries and attends to the cached keys: O(context) per token.

History (training). With ``config.use_history`` the forward returns ``memory``: every
layer's detached keys/values of the segment just processed (the last ``history_length``
positions; by default the whole segment). Passing it back prepends it to the keys/values
of the next segment, so layer l sees l segments back (context ``n_layer * T``)::

    memory = None
    for x in batches:           # row b of each batch continues row b of the previous one
        out = model(input_ids=x, labels=x, memory=memory)
        out.loss.backward()
        memory = out.memory     # None unless config.use_history
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from modformer.models.moduleformer.configuration_moduleformer import (
    UNBOUNDED_HISTORY,
    ModuleFormerConfig,
)
from modformer.models.moduleformer.flops import moduleformer_cache_memory, moduleformer_flops
from modformer.models.moduleformer.routing import ModuleFormerRouting
from modformer.models.outputs import (
    ModformerCausalLMOutput,
    cache_field,
    causal_lm_loss,
    keep_positions,
    output_cache,
    resolve_cache,
)
from modformer.models.routed import POOL_KINDS
from modformer.nn.moe import MixtureOfAttentionHeads, SparseMoE
from modformer.nn.moe_losses import (
    expert_load,
    load_concentration_loss,
    mutual_information_loss,
    pooled_switch_loss,
    routing_regularization,
    switch_loss,
)
from modformer.nn.norms import make_norm
from modformer.nn.rope_attention import positions_from_mask, rotary_cos_sin
from modformer.nn.routers import RouterSlots
from modformer.nn.routing import RoutingDecision


@dataclass
class ModuleFormerMemory:
    """Transformer-XL history: per-layer keys/values of the previous segment(s).

    ``keys[l]``/``values[l]``: (B, n_head, P, head_dim), detached (no gradient flows
    into a previous segment). ``key_padding_mask``: (B, P) bool, True = real token, or
    None when every remembered position is real.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    key_padding_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class ModuleFormerModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus what the LM head needs for the routing losses.

    ``router_outputs[l]`` is the (MoA, SMoE) `RoutingDecision` pair of layer l (flat
    (B*T, k) picks, with the routers' logits and probabilities); ``token_mask`` the
    flat (B*T,) real-token mask the routers saw (None: all real); ``memory`` the history
    for the next segment (None unless ``config.use_history``).
    """

    router_outputs: tuple[tuple[RoutingDecision, RoutingDecision], ...] | None = None
    token_mask: torch.Tensor | None = None
    memory: ModuleFormerMemory | None = None


@dataclass
class ModuleFormerCausalLMOutput(ModformerCausalLMOutput):
    """`ModformerCausalLMOutput` plus ``memory``: pass it to the next segment's call."""

    memory: ModuleFormerMemory | None = None


def _router_slots(slots: list[int] | None, num_slots: int) -> RouterSlots | None:
    """A pruned layer's router layout (see `ModuleFormerConfig`); None when unpruned."""
    return None if slots is None else RouterSlots(slots, num_slots)


class ModuleFormerBlock(GradientCheckpointingLayer):
    """`x + MoA(LN(x))`, then `x + SMoE(LN(x))`.

    The router outputs are returned (not stored), so a layer recomputed under activation
    checkpointing cannot report them twice; the KV cache is the keyword `cache`, which HF's
    checkpointing wrapper drops.
    """

    def __init__(self, config: ModuleFormerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = make_norm(config.norm_type, config.n_embd, config.layer_norm_epsilon)
        self.attn = MixtureOfAttentionHeads(
            config.n_embd,
            config.att_experts_in_layer(layer_idx),
            config.k_att,
            config.att_hidden,
            config.n_head,
            config.router_hidden,
            config.router_activation,
            config.attention_block_size,
            num_inserted=config.n_inserted_att_experts,
            slots=_router_slots(config.att_expert_slots_in_layer(layer_idx), config.n_att_experts),
            router_type=config.router_type,
            attention_type=config.attention_type,
            output_bias=config.moe_output_bias,
            router_bias=config.router_bias,
            kv_bias=config.kv_bias,
        )
        self.ln_2 = make_norm(config.norm_type, config.n_embd, config.layer_norm_epsilon)
        self.mlp = SparseMoE(
            config.n_embd,
            config.ffd_experts_in_layer(layer_idx),
            config.k_ffd,
            config.ffd_hidden,
            config.activation_function,
            config.router_hidden,
            config.router_activation,
            num_inserted=config.n_inserted_ffd_experts,
            slots=_router_slots(config.ffd_expert_slots_in_layer(layer_idx), config.n_ffd_experts),
            router_type=config.router_type,
            expert_mlp=config.expert_mlp,
            output_bias=config.moe_output_bias,
            router_bias=config.router_bias,
        )
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
    ) -> tuple[
        torch.Tensor, tuple[RoutingDecision, RoutingDecision], tuple[torch.Tensor, torch.Tensor]
    ]:
        """Returns the new x, the (MoA, SMoE) router outputs and the keys/values attended
        to (prefix + current), from which the model builds the next memory.

        ``rope`` (softmax_rope attention): the (cos, sin) angles of the keys this call
        rotates, i.e. of the current tokens, or of memory + current tokens: the memory
        holds unrotated keys, so they are rotated at their position in each new window.
        A KV cache holds rotated keys (the HF convention)."""
        h = self.ln_1(x)
        keys, values = self.attn.project_kv(h)
        if cache is not None:
            keys = self.attn.rotate(keys, rope)
            keys, values = cache.update(keys, values, self.layer_idx)
            attended_kv = (keys, values)
        else:
            if memory_kv is not None:
                keys = torch.cat([memory_kv[0].to(keys.dtype), keys], dim=2)
                values = torch.cat([memory_kv[1].to(values.dtype), values], dim=2)
            attended_kv = (keys, values)
            keys = self.attn.rotate(keys, rope)
        att_out, att_route = self.attn(h, keys, values, token_mask, key_padding_mask, rope)
        x = x + self.resid_dropout(att_out)
        ffd_out, ffd_route = self.mlp(self.ln_2(x), token_mask)
        x = x + self.resid_dropout(ffd_out)
        return x, (att_route, ffd_route), attended_kv


class ModuleFormerPreTrainedModel(CheckpointingMixin, PortableModelMixin, PreTrainedModel):
    config_class = ModuleFormerConfig
    config: ModuleFormerConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["ModuleFormerBlock"]
    _supports_cache_class = True

    @classmethod
    def auto_classes(cls) -> dict[str, type]:
        return {
            "AutoModel": ModuleFormerModel,
            "AutoModelForCausalLM": ModuleFormerForCausalLM,
            "AutoModelForSequenceClassification": ModuleFormerForSequenceClassification,
        }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) everywhere (GPT-2 style); the projections back into
        the residual stream (W_o, the FFN experts' second layer) are scaled by
        1/sqrt(2 * n_layer) as GPT-2's c_proj."""
        super()._init_weights(module)
        if isinstance(module, RouterSlots):
            module.reset_buffers()
            return
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, SparseMoE):
            stds = {"w_in": std, "w_out": residual_std}
        elif isinstance(module, MixtureOfAttentionHeads):
            stds = {"w_q": std, "w_o": residual_std}
        else:
            return
        for name, param_std in stds.items():
            for param in (getattr(module, name), getattr(module, f"{name}_inserted")):
                if param is not None:
                    init.normal_(param, mean=0.0, std=param_std)
        if module.output_bias is not None:
            init.zeros_(module.output_bias)

    def total_parameters(self) -> int:
        """Every parameter once (a tied LM head counts once)."""
        return self.num_parameters()

    def active_parameters(self) -> int:
        """Parameters one token touches: everything shared, plus k/N of each layer's
        expert weights (it runs k of the N experts). A tied embedding counts in full (the
        LM head uses all of it); an untied input embedding one row (the token's own)."""
        expert_fraction: dict[int, float] = {}
        for module in self.modules():
            if isinstance(module, (SparseMoE, MixtureOfAttentionHeads)):
                for p in module.expert_parameters():
                    expert_fraction[id(p)] = module.top_k / module.num_experts
        embedding = self.get_input_embeddings().weight
        output = self.get_output_embeddings()
        if output is None or output.weight is not embedding:
            expert_fraction[id(embedding)] = 1 / embedding.shape[0]
        return round(sum(p.numel() * expert_fraction.get(id(p), 1.0) for p in self.parameters()))


class ModuleFormerModel(ModuleFormerPreTrainedModel):
    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(ModuleFormerBlock(config, i) for i in range(config.n_layer))
        final_eps = config.final_norm_epsilon or config.layer_norm_epsilon
        self.ln_f = make_norm(config.norm_type, config.n_embd, final_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _masks(
        self,
        attention_mask: torch.Tensor | None,
        batch_size: int,
        seq_len: int,
        past_len: int,
        memory: ModuleFormerMemory | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(token_mask (B*T,), key_padding_mask (B, past + T)) as bools, True = real.

        With a KV cache, ``attention_mask`` covers past and current tokens (the HF
        convention `generate()` follows); with a memory it covers the current segment
        only, and the memory brings its own mask.
        """
        if attention_mask is None:
            if memory is None or memory.key_padding_mask is None:
                return None, None
            current = torch.ones(
                batch_size, seq_len, dtype=torch.bool, device=memory.key_padding_mask.device
            )
            return None, torch.cat([memory.key_padding_mask, current], dim=1)
        attention_mask = attention_mask.to(torch.bool)
        if memory is not None:
            if attention_mask.shape != (batch_size, seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; with a memory "
                    f"it must cover the current segment only: ({batch_size}, {seq_len})"
                )
            past = memory.key_padding_mask
            if past is None:
                past = attention_mask.new_ones(batch_size, memory.length)
            key_padding_mask = torch.cat([past, attention_mask], dim=1)
        else:
            if attention_mask.shape != (batch_size, past_len + seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the cache "
                    f"plus the input hold ({batch_size}, {past_len + seq_len}) tokens; pass "
                    f"a mask over past and current tokens"
                )
            key_padding_mask = attention_mask
        return key_padding_mask[:, -seq_len:].reshape(-1), key_padding_mask

    def _check_memory(self, memory: ModuleFormerMemory, batch_size: int) -> None:
        if not self.config.use_history:
            raise ValueError(
                "memory was passed but config.use_history is False; enable use_history "
                "or call the model without memory"
            )
        if len(memory.keys) != self.config.n_layer:
            raise ValueError(
                f"memory holds {len(memory.keys)} layers but the model has "
                f"{self.config.n_layer}; pass the memory this model returned"
            )
        if memory.batch_size != batch_size:
            raise ValueError(
                f"memory was built for batch size {memory.batch_size} but this batch has "
                f"{batch_size} rows; keep the batch size fixed while carrying memory (or "
                f"pass memory=None to start over)"
            )

    def _next_memory(
        self,
        layer_kv: list[tuple[torch.Tensor, torch.Tensor]],
        key_padding_mask: torch.Tensor | None,
        seq_len: int,
    ) -> ModuleFormerMemory:
        """Detached last ``history_length`` (default: ``seq_len``; unbounded: all the
        memory and the current segment) keys/values per layer."""
        keep = self.config.history_length or seq_len
        if keep == UNBOUNDED_HISTORY:
            keep = layer_kv[0][0].shape[2]
        keys = tuple(k[:, :, -keep:].detach() for k, _ in layer_kv)
        values = tuple(v[:, :, -keep:].detach() for _, v in layer_kv)
        mask = None if key_padding_mask is None else key_padding_mask[:, -keep:]
        return ModuleFormerMemory(keys, values, mask)

    def _rope(
        self,
        key_padding_mask: torch.Tensor | None,
        seq_len: int,
        past_len: int,
        use_memory: bool,
        position_ids: torch.Tensor | None,
        like: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE angles of the keys the blocks rotate (None for stick-breaking).

        Positions count the real tokens of the mask over prefix + current (so a
        left-padded row starts at 0); the blocks rotate the current keys (KV cache, or
        no prefix) or memory + current keys (history). Explicit ``position_ids`` (B, T)
        replace the current tokens' positions.
        """
        if self.config.attention_type != "softmax_rope":
            return None
        if position_ids is not None:
            if use_memory:
                raise ValueError(
                    "position_ids cannot be combined with a memory: the positions of the "
                    "memory's keys come from its mask; pass position_ids=None"
                )
            if position_ids.shape[-1] != seq_len:
                raise ValueError(
                    f"position_ids has {position_ids.shape[-1]} positions but the input has "
                    f"{seq_len} tokens; pass one position per input token"
                )
            positions = position_ids.reshape(-1, seq_len)
        else:
            positions = positions_from_mask(key_padding_mask, past_len + seq_len, like.device)
            if not use_memory:
                positions = positions[:, -seq_len:]
        return rotary_cos_sin(
            positions, self.config.att_head_dim, self.config.rope_theta, like.dtype
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        memory: ModuleFormerMemory | None = None,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> ModuleFormerModelOutput:
        """``cache_position`` (passed by `generate()`) is accepted and ignored. Stick-
        breaking attention uses no positions (``position_ids`` is ignored); softmax_rope
        attention takes them from the attention mask, or from ``position_ids``."""
        past_key_values = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T = inputs_embeds.shape[:2]
        if memory is not None:
            self._check_memory(memory, B)
            if past_key_values is not None or use_cache:
                raise ValueError(
                    "pass either memory (training with history) or a KV cache "
                    "(past_key_values / use_cache=True for generation), not both"
                )
        if use_cache is None:
            use_cache = self.config.use_cache and memory is None and not self.training
        use_cache, past_key_values = no_cache_when_checkpointing(self, use_cache, past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is not None:
            past_len = past_key_values.get_seq_length()
        else:
            past_len = memory.length if memory is not None else 0
        token_mask, key_padding_mask = self._masks(attention_mask, B, T, past_len, memory)
        use_memory = memory is not None and past_key_values is None
        rope = self._rope(key_padding_mask, T, past_len, use_memory, position_ids, inputs_embeds)

        x = self.drop(inputs_embeds)
        router_outputs = []
        layer_kv = []
        for i, block in enumerate(self.h):
            memory_kv = (memory.keys[i], memory.values[i]) if memory is not None else None
            x, routes, kv = block(
                x, token_mask, key_padding_mask, memory_kv, rope, cache=past_key_values
            )
            router_outputs.append(routes)
            layer_kv.append(kv)
        x = self.ln_f(x)

        new_memory = None
        if self.config.use_history:
            new_memory = self._next_memory(layer_kv, key_padding_mask, T)
        return ModuleFormerModelOutput(
            last_hidden_state=x,
            **cache_field(past_key_values if use_cache else None),
            router_outputs=tuple(router_outputs),
            token_mask=token_mask,
            memory=new_memory,
        )


class ModuleFormerForCausalLM(
    FlopCounting, ModuleFormerRouting, ModuleFormerPreTrainedModel, GenerationMixin
):
    flop_counter = staticmethod(moduleformer_flops)
    cache_memory_formula = staticmethod(moduleformer_cache_memory)
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.transformer = ModuleFormerModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def auxiliary_losses(
        self,
        router_outputs: tuple[tuple[RoutingDecision, RoutingDecision], ...],
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the enabled routing losses, and detached metrics.

        Metrics: ``aux/<name>`` for each enabled loss (mean over the 2 * n_layer routers;
        ``aux/routing_reg`` is the sum), and ``load/attn/<layer>`` / ``load/ffn/<layer>``:
        the fraction of real tokens that picked each expert (sums to k).
        """
        config = self.config
        routers = [(block.attn.router, block.mlp.router) for block in self.transformer.h]
        logits = [route.logits for routes in router_outputs for route in routes]
        aux_loss = logits[0].new_zeros(())
        metrics: dict[str, torch.Tensor] = {}

        if config.aux_loss_type != "none":
            if config.aux_loss_type == "mi":
                per_router = [mutual_information_loss(z, token_mask) for z in logits]
            elif config.aux_loss_type == "switch":
                per_router = [
                    switch_loss(r.logits, r.indices, token_mask, config.switch_z_loss_coef)
                    for routes in router_outputs
                    for r in routes
                ]
            else:  # "switch_pooled": JetMoE's one loss over the statistics of all routers
                indices = [r.indices for routes in router_outputs for r in routes]
                slots = [
                    None if router.slots is None else (router.slots.slots, router.slots.num_slots)
                    for layer_routers in routers
                    for router in layer_routers
                ]
                per_router = [pooled_switch_loss(logits, indices, token_mask, slots)]
            balance = torch.stack(per_router).mean()
            aux_loss = aux_loss + config.aux_loss_weight * balance
            metrics[f"aux/{config.aux_loss_type}"] = balance.detach()
        if config.load_concentration_weight > 0:
            concentration = torch.stack([load_concentration_loss(z, token_mask) for z in logits])
            concentration = concentration.mean()
            aux_loss = aux_loss + config.load_concentration_weight * concentration
            metrics["aux/load_concentration"] = concentration.detach()
        if config.routing_reg_weight > 0:
            regularizer = sum(
                (
                    routing_regularization(router.inserted_expert_embedding.weight)
                    for layer_routers in routers
                    for router in layer_routers
                    if router.inserted_expert_embedding is not None
                ),
                aux_loss.new_zeros(()),
            )
            aux_loss = aux_loss + config.routing_reg_weight * regularizer
            metrics["aux/routing_reg"] = regularizer.detach()

        for i, routes in enumerate(router_outputs):
            for kind, route in zip(POOL_KINDS, routes):
                metrics[f"load/{kind}/{i}"] = expert_load(
                    route.indices, route.num_choices, token_mask
                )
        return aux_loss, metrics

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        memory: ModuleFormerMemory | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ModuleFormerCausalLMOutput:
        """With ``labels``: ``loss = lm_loss + aux_loss`` and ``aux_metrics`` are filled."""
        past_key_values = resolve_cache(cache, past_key_values)
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            memory=memory,
            position_ids=kwargs.get("position_ids"),
        )
        hidden = out.last_hidden_state
        hidden = keep_positions(hidden, logits_to_keep)
        logits = self.lm_head(hidden)

        loss = lm_loss = aux_loss = aux_metrics = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            aux_loss, aux_metrics = self.auxiliary_losses(out.router_outputs, out.token_mask)
            loss = lm_loss + aux_loss
        return ModuleFormerCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            aux_metrics=aux_metrics,
            logits=logits,
            **cache_field(output_cache(out)),
            memory=out.memory,
        )


class ModuleFormerForSequenceClassification(
    SequenceClassificationMixin, ModuleFormerPreTrainedModel
):
    """`ModuleFormerModel` with a `score` head on the last real token (models/classification.py)."""

    base_model_class = ModuleFormerModel

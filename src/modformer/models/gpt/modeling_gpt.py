"""Vanilla GPT-2 as a Hugging Face `PreTrainedModel` (design §1).

Read top to bottom: `Block` is one pre-LN transformer layer, `GPTModel` the stack with
embeddings, `GPTForCausalLM` adds the tied LM head, the loss and `generate()` support.
The parameter names mirror Hugging Face GPT-2 (`transformer.h.0.attn.c_attn`, ...), so
the importer only has to transpose GPT-2's Conv1D weights.
"""

from __future__ import annotations

import math

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
from modformer.models.gpt.configuration_gpt import GPTConfig
from modformer.models.gpt.flops import gpt_cache_memory, gpt_flops
from modformer.models.outputs import (
    ModformerCausalLMOutput,
    cache_field,
    causal_lm_loss,
    keep_positions,
    output_cache,
    resolve_cache,
)
from modformer.nn.attention import CausalSelfAttention
from modformer.nn.masking import causal_padding_mask
from modformer.nn.mlp import MLP


class Block(GradientCheckpointingLayer):
    """`x + Attn(LN(x))`, then `x + MLP(LN(x))`.

    The KV cache is passed as the keyword `cache`: under activation checkpointing HF's
    layer wrapper drops it, so a recomputed layer cannot write it twice.
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(
            config.n_embd, config.d_inner, config.activation_function, config.dropout, config.bias
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, self.layer_idx)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPTPreTrainedModel(CheckpointingMixin, PortableModelMixin, PreTrainedModel):
    config_class = GPTConfig
    config: GPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_cache_class = True

    @classmethod
    def auto_classes(cls) -> dict[str, type]:
        return {
            "AutoModel": GPTModel,
            "AutoModelForCausalLM": GPTForCausalLM,
            "AutoModelForSequenceClassification": GPTForSequenceClassification,
        }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        super()._init_weights(module)
        # HF calls this per module that owns parameters, so the flag sits on the Linear.
        if isinstance(module, nn.Linear) and getattr(module, "is_residual_projection", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)


class GPTModel(GPTPreTrainedModel):
    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        for block in self.h:
            block.attn.c_proj.is_residual_projection = True
            block.mlp.c_proj.is_residual_projection = True
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        T = inputs_embeds.shape[1]
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        use_cache, past_key_values = no_cache_when_checkpointing(self, use_cache, past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if past_len + T > self.config.n_positions:
                raise ValueError(
                    f"sequence of {past_len + T} tokens exceeds n_positions="
                    f"{self.config.n_positions}; shorten the input or use a larger n_positions"
                )
            position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device)[None]

        x = self.drop(inputs_embeds + self.wpe(position_ids))
        mask = causal_padding_mask(attention_mask, T, past_len, x.device)
        for block in self.h:
            x = block(x, mask, cache=past_key_values)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x, **cache_field(past_key_values if use_cache else None)
        )


class GPTForCausalLM(FlopCounting, GPTPreTrainedModel, GenerationMixin):
    flop_counter = staticmethod(gpt_flops)
    cache_memory_formula = staticmethod(gpt_cache_memory)
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.transformer = GPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

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
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> ModformerCausalLMOutput:
        past_key_values = resolve_cache(cache, past_key_values)
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        hidden = keep_positions(hidden, logits_to_keep)
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModformerCausalLMOutput(
            loss=loss, lm_loss=loss, logits=logits, **cache_field(output_cache(out))
        )


class GPTForSequenceClassification(SequenceClassificationMixin, GPTPreTrainedModel):
    """`GPTModel` with a `score` head on the last real token (models/classification.py)."""

    base_model_class = GPTModel

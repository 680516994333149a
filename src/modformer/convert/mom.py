"""Phase-2 initialisation: a MoM model from a trained vanilla GPT (design §2; paper sec. 3.4).

Layer l of the vanilla model becomes module l - l0 of the chunk that covers it (l0 = the
chunk's first layer): its ln_1 + attention become an attention module, its ln_2 + MLP an
FFN module. A fixed ``1`` block takes its layer as is. Embeddings, the final LN and the LM
head are copied; routers keep their fresh initialisation.

Router width: unless `router_dim` is given, it scales with the model,
``phase2_router_dim(n_embd) = max(8, n_embd // 4)``. The MoMConfig default (256, the
official code's) suits d = 768; on a small model it makes the two GRU routers of a chunk
larger than the layers they route (at d = 128 a ``[1-2-1]`` K2H3S model had +44%
parameters over its vanilla source), so a MoM-vs-vanilla comparison would not be at
equal parameters. At d / 4 the routers add about 2% there.

Policy-specific copies:
- ``mom_same`` (the MoM-same ablation): the chunk's one tied module is the chunk's first
  (lowest) layer. The paper does not say which layer; the first is the official code's
  first module slot.
- ``moe``: attention module h is layer h; each of step h's E experts is a copy of layer
  h's FFN (upcycling), so the model starts as the vanilla model whatever the router does.
- ``moe_share``: shared expert e is the FFN of the chunk's layer e mod N (with E = N, the
  default, each layer's FFN once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modformer.models.gpt import Block, GPTConfig, GPTForCausalLM
from modformer.models.mom.configuration_mom import MoMConfig, default_chunks
from modformer.models.mom.modeling_mom import MoMForCausalLM
from modformer.models.mom.module_pools import AttentionModulePool, FFNModulePool

# Fields that fix the weights' shapes or meaning: they come from the source model.
SHAPE_FIELDS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "bias",
    "tie_word_embeddings",
)
# Fields taken from the source model unless overridden.
INHERITED_FIELDS = (
    "dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def load_vanilla(src: GPTForCausalLM | str | Path) -> GPTForCausalLM:
    """A `GPTForCausalLM`, a saved modformer GPT directory, or a local HF GPT-2 directory."""
    if isinstance(src, GPTForCausalLM):
        return src
    if isinstance(src, nn.Module):
        raise ValueError(
            f"phase-2 initialisation needs a vanilla GPTForCausalLM, got {type(src).__name__}"
        )
    path = Path(src)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{path} holds no config.json; pass a GPTForCausalLM, a saved modformer GPT "
            "directory or a Hugging Face GPT-2 directory"
        )
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a JSON object ({e})") from None
    if model_type == GPTConfig.model_type:
        from modformer.models.loading import load_pretrained

        return load_pretrained(path, GPTForCausalLM)
    if model_type == "gpt2":
        from modformer.convert.gpt2 import load_gpt2_directory

        return load_gpt2_directory(path)
    raise ValueError(
        f"{config_path} describes a {model_type!r} model; phase-2 initialisation starts "
        f"from a vanilla model ({GPTConfig.model_type!r} or 'gpt2')"
    )


def phase2_router_dim(n_embd: int) -> int:
    """The router width phase-2 initialisation uses by default (see the module docstring)."""
    return max(8, n_embd // 4)


def mom_config_from_gpt(
    gpt_config: GPTConfig, chunks: str | None, mom_name: str | None = None, **overrides: Any
) -> MoMConfig:
    """A MoMConfig with the source model's shape; checks the chunks cover its layers
    (None = the preset chunking for the source's depth, e.g. [1-1-4-1-4-1] for 12)."""
    fixed = sorted(set(overrides) & set(SHAPE_FIELDS))
    if fixed:
        raise ValueError(
            f"{fixed} come from the source model and cannot be overridden in phase-2 initialisation"
        )
    fields = {name: getattr(gpt_config, name) for name in SHAPE_FIELDS + INHERITED_FIELDS}
    fields["router_dim"] = phase2_router_dim(gpt_config.n_embd)
    if chunks is None:
        chunks = default_chunks(gpt_config.n_layer)
    config = MoMConfig(**{**fields, **overrides}, chunks=chunks, mom=mom_name)
    if config.num_vanilla_layers != gpt_config.n_layer:
        raise ValueError(
            f"chunks={chunks!r} covers {config.num_vanilla_layers} layers but the source "
            f"model has n_layer={gpt_config.n_layer}; the chunk sizes must sum to n_layer"
        )
    for kind in ("attn", "ffn"):
        sizes = getattr(config, f"{kind}_modules_per_chunk")
        chunk_sizes = [n for n in config.chunk_sizes if n > 1]
        if sizes is not None and list(sizes) != chunk_sizes:
            raise ValueError(
                f"{kind}_modules_per_chunk={list(sizes)} differs from the chunks' layer counts "
                f"{chunk_sizes}: phase-2 initialisation fills module i of a chunk with its "
                f"layer i, so every pool has one module per layer; build a model with smaller "
                f"pools with MoMConfig(..., {kind}_modules_per_chunk=...) and train it from "
                "scratch, or prune the converted model (modformer prune)"
            )
    return config


def _copy_attention(pool: AttentionModulePool, i: int, block: Block) -> None:
    """Block's ln_1 + attention -> module i. nn.Linear stores (out, in): transpose."""
    pool.ln_weight[i].copy_(block.ln_1.weight)
    pool.qkv_weight[i].copy_(block.attn.c_attn.weight.T)
    pool.proj_weight[i].copy_(block.attn.c_proj.weight.T)
    if pool.ln_bias is not None:
        pool.ln_bias[i].copy_(block.ln_1.bias)
        pool.qkv_bias[i].copy_(block.attn.c_attn.bias)
        pool.proj_bias[i].copy_(block.attn.c_proj.bias)


def _copy_ffn(pool: FFNModulePool, i: int, block: Block) -> None:
    """Block's ln_2 + MLP -> module i."""
    pool.ln_weight[i].copy_(block.ln_2.weight)
    pool.fc_weight[i].copy_(block.mlp.c_fc.weight.T)
    pool.proj_weight[i].copy_(block.mlp.c_proj.weight.T)
    if pool.ln_bias is not None:
        pool.ln_bias[i].copy_(block.ln_2.bias)
        pool.fc_bias[i].copy_(block.mlp.c_fc.bias)
        pool.proj_bias[i].copy_(block.mlp.c_proj.bias)


def source_layers(config: MoMConfig, num_modules: int) -> tuple[list[int], list[int]]:
    """For a chunk of `num_modules` layers: which of its layers fills each stored
    attention module and each stored FFN module (see the module docstring)."""
    if config.mom_same:
        return [0], [0]
    attn = list(range(num_modules))
    experts = config.num_experts if config.num_experts is not None else num_modules
    if config.policy == "moe":
        return attn, [h for h in range(config.H) for _ in range(experts)]
    if config.policy == "moe_share":
        return attn, [e % num_modules for e in range(experts)]
    return attn, attn


@torch.no_grad()
def mom_from_vanilla(
    src: GPTForCausalLM | str | Path,
    chunks: str | None = None,
    mom_name: str | None = None,
    **config_overrides: Any,
) -> MoMForCausalLM:
    """Phase 2 of two-phase training: a MoM whose modules are the vanilla model's layers.

    `chunks` (e.g. "[1-1-4-1-1]") must cover the source's n_layer layers (None: the
    preset chunking for that depth, e.g. the paper's [1-1-4-1-4-1] for 12); `mom_name`
    (e.g. "K2H4S") sets K, H and SKIP; other MoMConfig fields (policy, router, ...) go in
    `config_overrides`. With policy="vanilla" the result computes the source's logits.
    """
    gpt = load_vanilla(src)
    config = mom_config_from_gpt(gpt.config, chunks, mom_name, **config_overrides)
    model = MoMForCausalLM(config)
    source, target = gpt.transformer, model.transformer
    target.wte.load_state_dict(source.wte.state_dict())
    target.wpe.load_state_dict(source.wpe.state_dict())
    target.ln_f.load_state_dict(source.ln_f.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(gpt.lm_head.state_dict())

    layer = 0
    for entry, size in zip(target.h, config.chunk_sizes):
        if size == 1:
            entry.load_state_dict(source.h[layer].state_dict())
        else:
            blocks = source.h[layer : layer + size]
            attn_layers, ffn_layers = source_layers(config, size)
            for module, src_layer in enumerate(attn_layers):
                _copy_attention(entry.attn, module, blocks[src_layer])
            for module, src_layer in enumerate(ffn_layers):
                _copy_ffn(entry.ffn, module, blocks[src_layer])
        layer += size
    return model.to(dtype=gpt.dtype, device=gpt.device)

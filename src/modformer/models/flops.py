"""FLOP accounting shared by the model families: what `modformer cost` reports.

Each causal-LM class counts its own inference FLOPs from one forward's routing decisions
(`count_flops`, backed by its family's `flops.py`) with the tally and helpers below;
`modformer.eval.costs` validates the inputs and builds the cost table on top.

FLOP conventions (`inference_flops`)
------------------------------------
- One multiply-add is 2 FLOPs. Only matrix products are counted: linear layers, the
  attention score and value products, the routers and the LM head. Embedding lookups,
  LayerNorms, biases, activations, softmax, residual adds, the stick-breaking cumulative
  sum and the top-k selection are elementwise, O(d) or O(context) per token against the
  O(d^2) of the matmuls, and are not counted.
- The count is analytic, taken from the routing decisions of one real forward pass:
  a MoM token pays for the attention and FFN modules it picked at each chunk step (a
  SKIP pick costs nothing), a ModuleFormer token for its k attention and k FFN experts.
  Routers run for every token at every decision. Padding positions (attention_mask 0)
  are not tokens: they cost nothing and `per_token` divides by the real tokens.
- Attention scores: a query costs ``2 * 2 * width`` per key it attends to (``q.k`` and
  ``p * v`` over ``width = n_head * head_dim``; ModuleFormer: ``k * att_hidden``, one
  set of heads per selected expert). With ``attention="causal"`` (default) a query
  attends to the real keys at or before its position; in a MoM chunk step a token whose
  attention picks are all SKIP is no query, and no key unless the model keeps such
  tokens as zero keys (``all_skip_tokens="zero_key"``). With ``attention="dense"``
  every position of the batch is a query against every key position of the call: what
  dense attention kernels compute and what `torch.utils.flop_counter.FlopCounterMode`
  and DeepSpeed's FLOPs profiler (used by the MoM paper) count. Our MoM runs SDPA over
  all positions with an attention mask and ModuleFormer's blocked stick-breaking kernel
  computes only the blocks on or below the diagonal, so the kernels' real work lies
  between the two figures.

Relation to the MoM paper. Its TFLOPs come from DeepSpeed's profiler, which also counts
elementwise ops (about 1 FLOP per element; well under 1% of the total at GPT-2 sizes) and
dense attention (HF GPT-2 multiplies the full T x T scores); the batch shape behind its
totals is not stated. Compare relative figures (+x% against the dense baseline), and use
``attention="dense"`` for the closest match to its convention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from modformer.defaults import ATTENTION_MODES  # noqa: F401  (part of this module's API)
from modformer.nn.routers import RouterSlots

COMPONENTS = ("attention_projections", "attention_scores", "ffn", "router", "lm_head")


@dataclass
class FlopReport:
    """FLOPs of one inference forward over a batch, by component.

    total: FLOPs of the whole batch; tokens: real (unpadded) tokens in it;
    components: FLOPs per entry of `COMPONENTS`; attention: "causal" or "dense";
    active_parameters: parameters the average token touched on this forward (every
    shared parameter, plus each routed module or expert a token ran at least once; an
    untied input embedding counts one row, a tied one in full as the LM head).
    """

    total: int
    tokens: int
    components: dict[str, int]
    attention: str
    active_parameters: float

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    def per_token_components(self) -> dict[str, float]:
        return {name: flops / self.tokens for name, flops in self.components.items()}


class FlopTally:
    """FLOPs per component, accumulated as Python ints (exact at any size)."""

    def __init__(self) -> None:
        self.flops = dict.fromkeys(COMPONENTS, 0)

    def add(self, component: str, count: torch.Tensor | int, flops_each: int) -> None:
        self.flops[component] += int(count) * flops_each


def linear_flops(layer: nn.Linear) -> int:
    """FLOPs of one row through `layer`."""
    return 2 * layer.in_features * layer.out_features


def weight_flops(weight: torch.Tensor) -> int:
    """FLOPs of one row through one module of a stacked (modules, d_in, d_out) weight."""
    return 2 * weight.shape[-2] * weight.shape[-1]


def query_key_pairs(
    takes_part: torch.Tensor, attention: str, keys: torch.Tensor | None = None
) -> int:
    """(query, key) pairs whose scores an attention call costs.

    takes_part: (B, T) bool, the tokens that are queries (real tokens, and in a MoM step
    those with a module pick); keys: (B, T) bool, the tokens that are keys (default: the
    same; a MoM with `all_skip_tokens="zero_key"` keeps all-SKIP tokens as keys). causal:
    each query attends to the keys at or before its position. dense: every position
    against every position.
    """
    B, T = takes_part.shape
    if attention == "dense":
        return B * T * T
    keys_so_far = (takes_part if keys is None else keys).long().cumsum(1)
    return int((keys_so_far * takes_part).sum())


def router_output_flops(in_features: int, num_choices: int, slots: RouterSlots | None) -> int:
    """FLOPs of one row through a router's output matmul; a pruned router (`slots`)
    computes at its unpruned width."""
    return 2 * in_features * (num_choices if slots is None else slots.num_slots)


def total_parameters(model: PreTrainedModel) -> int:
    """Every parameter once (a tied LM head counts once)."""
    return model.num_parameters()


def finish_report(
    model: PreTrainedModel, tally: FlopTally, real: torch.Tensor, attention: str, active: float
) -> FlopReport:
    n = int(real.sum())
    tally.add("lm_head", n, linear_flops(model.lm_head))
    embedding = model.get_input_embeddings().weight
    if model.lm_head.weight is not embedding:  # untied: a token reads one embedding row
        active -= embedding.numel() - embedding.shape[1]
    return FlopReport(
        total=sum(tally.flops.values()),
        tokens=n,
        components=dict(tally.flops),
        attention=attention,
        active_parameters=active,
    )


@dataclass
class CacheMemory:
    """Activation memory of an inference forward over batch_size x seq_len tokens with a
    KV cache, in bytes by component: the shape of the MoM paper's Table 1 memory (logits
    plus a per-layer cache term). Weights are not included.

    logits: B * T * vocab_size in the model's dtype (every position gets logits);
    kv_cache: keys and values of the `cache_layers` attention layers;
    key_flags: MoM's "is a key" flag layers (one bool per position in the key and in the
    value slot of each chunk step, only when a token may skip a whole attention step);
    router_state: MoM's GRU states (attention and FFN router, the model's dtype) of the
    chunk being run: transient (not cached), alive during that chunk only.
    """

    batch_size: int
    seq_len: int
    logits: int
    kv_cache: int
    cache_layers: int
    key_flags: int = 0
    router_state: int = 0

    @property
    def total(self) -> int:
        return self.logits + self.kv_cache + self.key_flags + self.router_state


def cache_memory_terms(
    config, batch_size: int, seq_len: int, dtype: torch.dtype, cache_layers: int, kv_width: int
) -> CacheMemory:
    """Logits and keys + values of `cache_layers` layers of `kv_width` features each."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    tokens, itemsize = batch_size * seq_len, dtype.itemsize
    return CacheMemory(
        batch_size=batch_size,
        seq_len=seq_len,
        logits=tokens * config.vocab_size * itemsize,
        kv_cache=cache_layers * 2 * tokens * kv_width * itemsize,
        cache_layers=cache_layers,
    )


class FlopCounting:
    """Mixin of modformer's causal LMs: `count_flops` runs the family's FLOP counter, the
    function its class names in `flop_counter`, and `cache_memory` its memory formula,
    `cache_memory_formula` (both in each family's `flops.py`)."""

    flop_counter: Callable[..., FlopReport]
    cache_memory_formula: Callable[..., CacheMemory]

    def cache_memory(self, batch_size: int, seq_len: int) -> CacheMemory:
        """Logits + KV cache (+ MoM's key flags and router state) of one inference forward
        over batch_size x seq_len tokens with a cache, from the config and dtype alone."""
        return type(self).cache_memory_formula(self.config, batch_size, seq_len, self.dtype)

    def count_flops(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        real: torch.Tensor,
        attention: str,
    ) -> FlopReport:
        """Matmul FLOPs of one inference forward, by component, from its routing decisions
        (`real`: (B, T) bool, the unpadded tokens). Conventions: the module docstring; call
        it through `modformer.eval.costs.inference_flops`, which checks the inputs."""
        return type(self).flop_counter(self, input_ids, attention_mask, real, attention)

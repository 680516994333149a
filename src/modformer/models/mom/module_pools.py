"""MoM's module pools: the N attention or N FFN modules of one chunk (design §2).

Each module k has its own pre-LN and linear maps, stored stacked over the modules as
(num_modules, d_in, d_out) parameters; a pool is an `Experts` layer (`nn/experts.py`), so
one routing decision's (token, pick) pairs are computed by its backend: the ``"loop"``
definition or the ``"grouped"`` fast path (the default). Per pair (token t, module k,
routing weight r_k):

- input side: ``LN_k(x_t) W_k + b_k`` (`NormedLinear`; the grouped backend folds each
  module's LN affine and bias into its weight once per forward);
- output side: ``sum_k r_k (h_tk W_k + b_k)``.

SKIP picks (index = pool size) select no module: their pair rows are exactly zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from modformer.models.mom.configuration_mom import MoMConfig
from modformer.nn.activations import get_activation
from modformer.nn.experts import ExpertPairs, Experts, NormedLinear

if TYPE_CHECKING:  # the modeling file imports this one
    from modformer.models.mom.modeling_mom import AttentionMasks


class ModulePool(Experts):
    """Shared by both pools: the per-module pre-LN (`ln_weight`, `ln_bias`: (N, d)) and
    the stacked projections, named as in saved checkpoints."""

    def __init__(self, config: MoMConfig, num_modules: int, backend: str = "grouped"):
        super().__init__(num_modules, backend)
        self.num_modules = num_modules
        self.n_embd = config.n_embd
        self.eps = config.layer_norm_epsilon
        self.ln_weight = nn.Parameter(torch.ones(num_modules, config.n_embd))
        self.ln_bias = self._bias(config, config.n_embd)

    def _weight(self, d_in: int, d_out: int) -> nn.Parameter:
        # Values come from `reset_parameters`, which the model's `_init_weights` calls.
        return nn.Parameter(torch.empty(self.num_modules, d_in, d_out))

    def _bias(self, config: MoMConfig, d_out: int) -> nn.Parameter | None:
        return nn.Parameter(torch.zeros(self.num_modules, d_out)) if config.bias else None

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters(recurse=False))
        return f"num_modules={self.num_modules}, {shapes}"

    def reset_parameters(self, std: float, resid_std: float) -> None:
        """GPT-2 init: LN weight 1, biases 0, input projection N(0, std), output
        projection (`proj_weight`, on the residual path) N(0, resid_std)."""
        for name, param in self.named_parameters(recurse=False):
            if name == "ln_weight":
                init.ones_(param)
            elif name.endswith("bias"):
                init.zeros_(param)
            else:
                init.normal_(param, mean=0.0, std=resid_std if name == "proj_weight" else std)

    def _normed(self, weight: torch.Tensor, bias: torch.Tensor | None) -> NormedLinear:
        return NormedLinear(self.ln_weight, self.ln_bias, weight, bias, self.eps)


class AttentionModulePool(ModulePool):
    """N attention modules: own pre-LN, fused W_Q|W_K|W_V (d x 3d) and W_O (d x d)."""

    def __init__(self, config: MoMConfig, num_modules: int, backend: str = "grouped"):
        super().__init__(config, num_modules, backend)
        d = config.n_embd
        self.n_head = config.n_head
        self.head_dim = d // config.n_head
        self.qkv_weight = self._weight(d, 3 * d)
        self.qkv_bias = self._bias(config, 3 * d)
        self.proj_weight = self._weight(d, d)
        self.proj_bias = self._bias(config, d)
        self.weighted_qkv = config.weighted_qkv
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv_projection(self) -> NormedLinear:
        """`LN_k(x) W^QKV_k + b_k`, made once per forward and shared by the chunk's steps."""
        return self._normed(self.qkv_weight, self.qkv_bias)

    def forward(
        self,
        x: torch.Tensor,
        pairs: ExpertPairs,
        qkv_projection: NormedLinear,
        mask: AttentionMasks,
        cache: Cache | None,
        layer_idx: int,
        is_key: torch.Tensor | None = None,
        key_flag_layer: int | None = None,
    ) -> torch.Tensor:
        """Eq. 5 for x (B, T, d) -> attention output (B, T, d) (the caller adds the
        residual): q/k/v are sums over a token's picks of ``LN_k(x) W_k`` (times r_k with
        `weighted_qkv`) and the output is ``sum_k r_k a W^O_k``.

        is_key: (B, T) bool, False for tokens whose picks are all SKIP, or None when no
        token can be; with a cache their flags are kept in layer `key_flag_layer`.
        """
        B, T, d = x.shape
        qkv_rows = pairs.normed_linear(x.reshape(B * T, d), qkv_projection)
        qkv = pairs.combine(qkv_rows, weighted=self.weighted_qkv)
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in qkv.split(d, 1)
        )
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        attn_mask = mask.base
        if is_key is not None:
            if cache is not None:
                flags = is_key[:, None, :, None]
                is_key = cache.update(flags, flags, key_flag_layer)[0][:, 0, :, 0]
            attn_mask = mask.restricted_to_keys(is_key)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and T > 1,
        )
        a = y.transpose(1, 2).reshape(B * T, d)
        out = pairs.linear_sum(pairs.gather(a), self.proj_weight, self.proj_bias)
        return self.resid_dropout(out.view(B, T, d))


class FFNModulePool(ModulePool):
    """N FFN modules: own pre-LN and a GPT-2 MLP (d -> d_inner -> d)."""

    def __init__(self, config: MoMConfig, num_modules: int, backend: str = "grouped"):
        super().__init__(config, num_modules, backend)
        self.fc_weight = self._weight(config.n_embd, config.d_inner)
        self.fc_bias = self._bias(config, config.d_inner)
        self.proj_weight = self._weight(config.d_inner, config.n_embd)
        self.proj_bias = self._bias(config, config.n_embd)
        self.act = get_activation(config.activation_function)
        self.dropout = nn.Dropout(config.dropout)

    def fc_projection(self) -> NormedLinear:
        """`LN_k(u) W^fc_k + b_k`, made once per forward and shared by the chunk's steps."""
        return self._normed(self.fc_weight, self.fc_bias)

    def forward(
        self, u: torch.Tensor, pairs: ExpertPairs, fc_projection: NormedLinear
    ) -> torch.Tensor:
        """Eq. 6: sum_k r_k * m^F_k(u) for u (B, T, d); SKIP picks add nothing."""
        B, T, d = u.shape
        hidden = self.act(pairs.normed_linear(u.reshape(B * T, d), fc_projection))
        out = pairs.linear_sum(hidden, self.proj_weight, self.proj_bias)
        return self.dropout(out.view(B, T, d))

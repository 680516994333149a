r"""Causal softmax attention with rotary position embeddings (RoPE, Su et al. 2021).

The alternative to stick-breaking attention in ModuleFormer's Table 4 ablation
("- Stick-breaking + Softmax&RoPE") and JetMoE's attention. Math::

    RoPE:   x' = x * cos(p * w) + rotate_half(x) * sin(p * w),
            w_i = theta^(-2i / D) for i < D/2, repeated for both halves
            rotate_half([x1, x2]) = [-x2, x1]           (x1, x2 the two halves of x)
    scores: z_{j,t} = q'_t . k'_j / sqrt(D)             (keys j <= t, real keys only)
    output: o_t = sum_j softmax_j(z_{., t}) v_j

Pairs are (i, i + D/2) ("rotate half", the GPT-NeoX/Llama/JetMoE layout, not the
interleaved (2i, 2i+1) one). Every head's full ``head_dim`` is rotated. ``q'_t . k'_j``
depends on the positions only through ``t - j``.

Positions come from the attention mask, so a left-padded row numbers its first real
token 0 exactly as it would alone (`positions_from_mask`).

`softmax_attention` is the fast path (`F.scaled_dot_product_attention`);
`softmax_attention_reference` writes the equations out in fp64 (the test oracle).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modformer.nn.masking import causal_padding_mask


def positions_from_mask(
    key_padding_mask: Tensor | None, length: int, device: torch.device
) -> Tensor:
    """(B or 1, length) long positions: ``cumsum(mask) - 1`` (0 at padding), or
    ``0 .. length-1`` without a mask. Padded slots get 0; their outputs are ignored."""
    if key_padding_mask is None:
        return torch.arange(length, device=device)[None]
    return (key_padding_mask.long().cumsum(-1) - 1).clamp_min(0)


def rotary_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin of ``positions * w`` as (B, 1, T, head_dim) in `dtype` (made in fp32,
    fp64 for fp64), ready to broadcast over heads."""
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    compute = torch.promote_types(dtype, torch.float32)
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = (1.0 / theta ** (exponents / head_dim)).to(compute)
    angles = positions[..., None].to(compute) * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by the angles of `rotary_cos_sin` (B, 1, T, D)."""
    return x * cos + rotate_half(x) * sin


def _attention_mask(key_padding_mask: Tensor | None, Tq: int, Tk: int, device) -> Tensor | None:
    """Bool (B, 1, Tq, Tk), True = may attend: causal over the prefix + current keys and
    no padded key; every row may see itself so that no row is empty (SDPA would return
    NaN). None when plain causal attention needs no mask."""
    return causal_padding_mask(key_padding_mask, Tq, Tk - Tq, device)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal softmax attention by `F.scaled_dot_product_attention`.

    q: (B, H, Tq, D), row i at position ``Tk - Tq + i``; k, v: (B, H, Tk, D) with the
    first ``Tk - Tq`` a prefix (cache / memory); key_padding_mask: (B, Tk) bool, True =
    real. ``scale`` defaults to 1/sqrt(D). Padded query rows give finite, meaningless
    outputs.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if Tk < Tq:
        raise ValueError(f"k has {Tk} positions but q has {Tq}: keys must cover the queries")
    mask = _attention_mask(key_padding_mask, Tq, Tk, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and Tq > 1, scale=scale
    )


def softmax_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The equations in fp64 with an explicit mask (same visibility as the fast path)."""
    Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    t = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = (j <= t)[None, None]
    if key_padding_mask is not None:
        visible = visible & (key_padding_mask[:, None, None, :] | (j == t)[None, None])
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ v.double()).to(q.dtype)

"""Attention masks for SDPA.

Every model builds one boolean mask per forward (True = may attend) of shape
(B, 1, T_q, T_kv) and passes it to `F.scaled_dot_product_attention`. Without padding
and without a cache prefix we return None and let SDPA use its fused causal path.
"""

from __future__ import annotations

import torch


def causal_padding_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B, 1, q_len, past_len + q_len) mask: causal and excluding padded keys.

    `attention_mask` is the usual HF 2-D mask over all positions seen so far
    (past + current), 1 for real tokens and 0 for padding, or None.

    A padded query position whose every key is masked would make SDPA return NaN, so
    each position may always attend to itself; outputs at padded positions are
    meaningless anyway and are excluded from losses by the caller.
    """
    kv_len = past_len + q_len
    if attention_mask is None and past_len == 0:
        return None
    q_pos = torch.arange(past_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]  # (q, kv)
    mask = mask[None, None]  # (1, 1, q, kv)
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache "
                f"plus the input hold {kv_len}; pass a mask over past and current tokens."
            )
        keep = attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
        is_self = (k_pos[None, :] == q_pos[:, None])[None, None]
        mask = mask & (keep | is_self)
    return mask

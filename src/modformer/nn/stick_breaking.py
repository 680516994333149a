r"""Stick-breaking attention (ModuleFormer, sec. 3.2, eqs. 3-5) in O(T^2) time.

Math
----
Query row ``i`` of ``q`` (``Tq`` rows) sits at absolute position ``t = P + i`` with
``P = Tk - Tq`` (the first ``P`` keys are a prefix: Transformer-XL history or a KV cache).
It attends to keys ``j <= t``::

    z_{j,t}    = k_j . q_t / sqrt(D)
    beta_{j,t} = sigmoid(z_{j,t})                                     (eq. 3)
    p_{j,t}    = beta_{j,t} * prod_{j < l <= t} (1 - beta_{l,t})      (eq. 4)
    o_t        = sum_{j <= t} p_{j,t} v_j                             (eq. 5, before W_o)

The weights are not normalised: whatever stick is left over after key 0 is dropped.

Log space. With ``log(1 - sigmoid(z)) = logsigmoid(-z)`` and the identity
``logsigmoid(z) - logsigmoid(-z) = z``::

    log p_{j,t} = logsigmoid(z_{j,t}) + sum_{j < l <= t} logsigmoid(-z_{l,t})
                = z_{j,t} + R_{j,t},    R_{j,t} = sum_{j <= l <= t} logsigmoid(-z_{l,t})

``R`` is an inclusive *reverse* cumulative sum along the key axis: O(T) per row, O(T^2)
in all, and only one ``logsigmoid`` per score. (The official IBM code computes the same
sum as a matmul with a T x T triangular matrix, O(T^3).) All of this runs in fp32, also
for bf16/fp16 inputs; the output is cast back to ``q.dtype``.

Masking. A key that may not be attended (in the future of the row, or padded with
``key_padding_mask`` False) gets ``z = -inf``: then ``logsigmoid(-z) = 0`` (its
``1 - beta`` factor is 1, it does not break the stick) and ``log p = -inf`` (``p = 0``),
with no special cases further down. A row with no visible key returns 0.

Padded query rows are computed like any other row: they see the real keys at or before
their position. Their outputs are finite and meaningless; the caller ignores them (and
passes them no gradient, or a gradient it does not care about).

Backward (derived by hand, checked with ``torch.autograd.gradcheck`` in the tests)
------------------------------------------------------------------------------
Fix a row ``t`` and drop it from the indices. Given ``dO = dL/do``::

    g_j  = dL/dp_j      = dO . v_j
    u_j  = dL/dlog p_j  = p_j * g_j
    dv_j = sum_t p_{j,t} dO_t

``log p_j = z_j + sum_{l >= j} logsigmoid(-z_l)`` depends on ``z_m`` through its own
``z_j`` term (``m = j``, derivative 1) and through every ``l = m >= j`` term, with
``d logsigmoid(-z)/dz = -sigmoid(z) = -beta``::

    dL/dz_m = u_m - beta_m * sum_{j <= m} u_j = u_m - beta_m * U_m

``U`` is an inclusive *forward* cumulative sum of ``u`` along keys. Masked keys have
``p = 0`` and ``beta = sigmoid(-inf) = 0``, so their ``dL/dz`` is 0. Finally
``dq_t = sum_j dz_{j,t} k_j / sqrt(D)`` and ``dk_j = sum_t dz_{j,t} q_t / sqrt(D)``.

Memory
------
Query rows are processed ``block_size`` at a time, and a block of rows ``[r0, r1)`` only
looks at the keys it can see (``j < P + r1``), which also skips the upper triangle.
Only one block's ``block_size x Tk`` score matrices are alive at once. The autograd
Function saves only ``q, k, v`` (and the mask); the backward recomputes each block's
scores instead of storing ``T x T`` per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, block_size: int | None
) -> None:
    """Raise a ValueError naming the problem for inputs the kernels cannot handle."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"stick_breaking_attention expects 4-D (batch, heads, time, head_dim) "
                f"tensors, but {name} has shape {tuple(x.shape)}."
            )
    B, H, Tq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}: batch, heads "
            f"and head_dim must match (k is (B, H, Tk, D))."
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}: v needs one "
            f"row per key (same batch, heads and Tk)."
        )
    Tk = k.shape[2]
    if Tk < Tq:
        raise ValueError(
            f"k has {Tk} positions but q has {Tq}: the keys must cover the queries "
            f"(Tk >= Tq; the first Tk - Tq keys are the prefix / cache)."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}.")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Tk):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
                f"(batch, Tk) = ({B}, {Tk}) with True for real tokens."
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}."
            )
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor (True = real token), got "
                f"{key_padding_mask.dtype}; convert with `attention_mask.bool()`."
            )
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}.")


def _block_log_weights(
    q_blk: Tensor,
    k_vis: Tensor,
    key_padding_mask: Tensor | None,
    first_pos: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Scores ``z`` and log weights ``log p`` (fp32) of one block of query rows.

    ``q_blk`` (B, H, n, D) holds rows at absolute positions ``first_pos .. first_pos+n-1``;
    ``k_vis`` (B, H, first_pos + n, D) are the keys those rows can see at most. Both are
    already in the compute dtype (fp32, or fp64 for fp64 inputs).
    Masked entries have ``z = log p = -inf``.
    """
    n = q_blk.shape[2]
    n_keys = k_vis.shape[2]
    z = torch.matmul(q_blk, k_vis.transpose(-1, -2)).mul_(scale)
    # Causal mask: only the last n columns (keys first_pos..) can be in a row's future.
    future = torch.ones(n, n, dtype=torch.bool, device=z.device).triu_(1)
    z[..., first_pos:].masked_fill_(future, float("-inf"))
    if key_padding_mask is not None:
        padded = ~key_padding_mask[:, None, None, :n_keys]
        z.masked_fill_(padded, float("-inf"))
    log_one_minus_beta = F.logsigmoid(-z)
    # Inclusive reverse cumsum along keys: R_j = sum_{l >= j} logsigmoid(-z_l).
    reverse_sum = log_one_minus_beta.flip(-1).cumsum(-1).flip(-1)
    log_p = reverse_sum.add_(z)
    return z, log_p


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (gradcheck needs it)."""
    return torch.promote_types(x.dtype, torch.float32)


class _StickBreakingAttention(torch.autograd.Function):
    """Blocked forward, blocked recomputing backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, block_size):  # type: ignore[override]
        B, H, Tq, D = q.shape
        prefix = k.shape[2] - Tq
        scale = 1.0 / math.sqrt(D)
        dtype = _compute_dtype(q)
        out = torch.empty(B, H, Tq, v.shape[3], dtype=dtype, device=q.device)
        q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        for r0 in range(0, Tq, block_size):
            r1 = min(r0 + block_size, Tq)
            n_keys = prefix + r1
            _, log_p = _block_log_weights(
                q32[:, :, r0:r1], k32[:, :, :n_keys], key_padding_mask, prefix + r0, scale
            )
            out[:, :, r0:r1] = torch.matmul(log_p.exp_(), v32[:, :, :n_keys])
        ctx.save_for_backward(q, k, v, key_padding_mask)
        ctx.block_size = block_size
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, key_padding_mask = ctx.saved_tensors
        block_size = ctx.block_size
        B, H, Tq, D = q.shape
        prefix = k.shape[2] - Tq
        scale = 1.0 / math.sqrt(D)
        dtype = _compute_dtype(q)
        q32, k32, v32 = q.to(dtype), k.to(dtype), v.to(dtype)
        grad_out = grad_out.to(dtype)
        dq = torch.zeros_like(q32)
        dk = torch.zeros_like(k32)
        dv = torch.zeros_like(v32)
        for r0 in range(0, Tq, block_size):
            r1 = min(r0 + block_size, Tq)
            n_keys = prefix + r1
            q_blk, k_vis, v_vis = q32[:, :, r0:r1], k32[:, :, :n_keys], v32[:, :, :n_keys]
            do_blk = grad_out[:, :, r0:r1]
            z, log_p = _block_log_weights(q_blk, k_vis, key_padding_mask, prefix + r0, scale)
            p = log_p.exp_()
            dv[:, :, :n_keys] += torch.matmul(p.transpose(-1, -2), do_blk)
            # u = dL/dlog p = p * (dO . v);  dz = u - beta * cumsum(u)
            u = torch.matmul(do_blk, v_vis.transpose(-1, -2)).mul_(p)
            dz = u.sub_(torch.sigmoid_(z).mul_(u.cumsum(-1)))
            dz.mul_(scale)
            dq[:, :, r0:r1] = torch.matmul(dz, k_vis)
            dk[:, :, :n_keys] += torch.matmul(dz.transpose(-1, -2), q_blk)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def stick_breaking_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    block_size: int = 128,
) -> Tensor:
    """Causal stick-breaking attention, O(T^2) time, one block of scores alive at a time.

    Args:
        q: (B, H, Tq, D) queries; row i sits at absolute position ``Tk - Tq + i``.
        k: (B, H, Tk, D) keys, ``Tk >= Tq``; the first ``Tk - Tq`` are a prefix
            (history / KV cache) that every query row sees.
        v: (B, H, Tk, Dv) values.
        key_padding_mask: optional (B, Tk) bool, True = real token. Padded keys get
            ``p = 0`` and do not break the stick. Outputs at padded query rows are finite
            but meaningless.
        block_size: query rows per block; peak memory is about ``B*H*block_size*Tk``
            fp32 scores times a few temporaries.

    Returns:
        (B, H, Tq, Dv) unnormalised attention output in ``q.dtype`` (computed in fp32).
    """
    _check_inputs(q, k, v, key_padding_mask, block_size)
    return _StickBreakingAttention.apply(q, k, v, key_padding_mask, block_size)


def stick_breaking_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Literal eqs. 3-4 in fp64 with an explicit product over ``j < l <= t``: the oracle.

    O(T^3) memory (it materialises every product term); for tests on small sizes only.
    Differentiable with plain autograd.
    """
    _check_inputs(q, k, v, key_padding_mask, None)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qd, kd, vd = q.double(), k.double(), v.double()
    beta = torch.sigmoid(qd @ kd.transpose(-1, -2) / math.sqrt(D))  # (B, H, Tq, Tk)
    t = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # absolute query positions
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = (j <= t)[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    beta = torch.where(visible, beta, torch.zeros_like(beta))  # masked key: beta = 0
    # between[t, j, l] = j < l <= t; masked l have beta = 0 so their factor is 1.
    l_idx = torch.arange(Tk, device=q.device)
    between = (j[..., None] < l_idx) & (l_idx <= t[..., None])  # (Tq, Tk, Tk)
    factors = torch.where(between, 1.0 - beta[..., None, :], torch.ones_like(beta[..., None, :]))
    p = beta * factors.prod(dim=-1)  # (B, H, Tq, Tk)
    return (p @ vd).to(q.dtype)

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

Log space. With ``log(1 - sigmoid(z)) = -softplus(z)`` and the identity
``log sigmoid(z) = z - softplus(z)``::

    log p_{j,t} = log sigmoid(z_{j,t}) - sum_{j < l <= t} softplus(z_{l,t})
                = z_{j,t} - S_{j,t},       S_{j,t} = sum_{j <= l <= t} softplus(z_{l,t})

``S`` is an inclusive *reverse* cumulative sum along the key axis (flip, cumsum, flip):
O(T) per row, O(T^2) in all, and one ``softplus`` per score. (The official IBM code
computes the same sum as a matmul with a T x T triangular matrix, O(T^3).) All of this
runs in fp32, also for bf16/fp16 inputs (fp64 inputs stay fp64); the output is cast
back to ``q.dtype``. Weights below ``exp(-80) ~ 1.8e-35`` are raised to it (see
``_LOG_P_FLOOR``).

Masking. A key a row may not see (in its future, or padded: ``key_padding_mask`` False)
gets ``softplus = 0`` (its ``1 - beta`` factor is 1: it does not break the stick),
``p = 0`` and, for the backward, ``beta = 0``. A row with no visible key returns 0.

Padded query rows are computed like any other row: they see the real keys at or before
their position, so their outputs are finite (0 if no real key precedes them) and
meaningless; the caller ignores them. A gradient sent into them flows on to those keys
like any other row's.

Backward (derived by hand, checked with ``torch.autograd.gradcheck`` in the tests)
------------------------------------------------------------------------------
Fix a row ``t`` and drop it from the indices. Given ``dO = dL/do``::

    g_j  = dL/dp_j      = dO . v_j
    u_j  = dL/dlog p_j  = p_j * g_j
    dv_j = sum_t p_{j,t} dO_t

``log p_j = z_j - sum_{l >= j} softplus(z_l)`` depends on ``z_m`` through its own
``z_j`` term (only for ``j = m``, derivative 1) and through the ``l = m`` term of every
``j <= m``, with ``d softplus(z)/dz = sigmoid(z) = beta``::

    dL/dz_m = u_m - beta_m * sum_{j <= m} u_j = u_m - beta_m * U_m

``U`` is an inclusive *forward* cumulative sum of ``u`` along keys. Invisible keys have
``p = 0`` (so ``u = 0``) and ``beta = 0``, so their ``dL/dz`` is 0. Finally
``dq_t = sum_j dL/dz_{j,t} k_j / sqrt(D)`` and ``dk_j = sum_t dL/dz_{j,t} q_t / sqrt(D)``.

Memory
------
Query rows are processed ``block_size`` at a time, and a block of rows ``[r0, r1)`` only
looks at the keys it can see (``j < P + r1``), which also skips the upper triangle.
Only one block's score-sized buffers (``B x H x block_size x Tk``, at most three at a
time) are alive at once. The autograd Function saves only ``q, k, v`` (and the mask);
the backward recomputes each block's weights instead of storing ``T x T`` per head.
"""

from __future__ import annotations

import math

import torch
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


# log p is clamped at -80 before exp(): weights below exp(-80) ~ 1.8e-35 are raised to it
# (an absolute error under 2e-35 per weight; invisible keys are still set to exactly 0).
# Why: most weights of a long row are far smaller, and fp32 exp() of inputs below about
# -87 underflows to subnormals, which takes a slow path on x86 CPUs (~100x slower on the
# AVX2 machine we measured); exp(-80) is a normal float.
_LOG_P_FLOOR = -80.0


def _fill_invisible(x: Tensor, future: Tensor, padded: Tensor | None, value: float) -> Tensor:
    """In place: ``x[..., j] = value`` for every key a row may not see (see `_block_weights`)."""
    n = x.shape[-2]
    # The block's rows sit at the last n key positions: only there can a key be in the
    # future of a row (an n x n upper triangle).
    x[..., -n:].masked_fill_(future[:n, :n], value)
    if padded is not None:
        x.masked_fill_(padded[..., : x.shape[-1]], value)
    return x


def _invisible_masks(
    key_padding_mask: Tensor | None, block_size: int, Tq: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Masks built once per call: the causal triangle of a block and the padded keys."""
    n = min(block_size, Tq)
    future = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
    padded = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return future, padded


def _block_weights(
    q_blk: Tensor,
    k_vis: Tensor,
    future: Tensor,
    padded: Tensor | None,
    with_beta: bool,
) -> tuple[Tensor, Tensor | None]:
    """Stick-breaking weights ``p`` (and ``beta`` for the backward) of one block of rows.

    ``q_blk`` (B, H, n, D) holds (already scaled by 1/sqrt(D)) queries at the last ``n``
    positions covered by ``k_vis`` (B, H, n_keys, D), the keys those rows can see at most;
    ``future`` and ``padded`` come from `_invisible_masks`. Everything is in
    the compute dtype (fp32, or fp64 for fp64 inputs). Invisible keys get ``p = 0`` and
    ``beta = 0`` (so their ``1 - beta`` factor is 1 and their ``dL/dz`` is 0).
    """
    z = torch.matmul(q_blk, k_vis.transpose(-1, -2))
    # softplus(z) = -logsigmoid(-z) = -log(1 - beta); 0 for invisible keys.
    softplus_z = _fill_invisible(exact_softplus(z), future, padded, 0.0)
    # S_j = sum_{l >= j} softplus(z_l), an inclusive reverse cumsum: flip, cumsum, flip.
    # (`del` frees each score-sized buffer as soon as possible: at most 3 are alive.)
    flipped = softplus_z.flip(-1)
    del softplus_z
    reverse_sum = flipped.cumsum_(-1).flip(-1)
    beta = None
    if with_beta:  # reuse the flipped buffer
        beta = _fill_invisible(torch.sigmoid(z, out=flipped), future, padded, 0.0)
    del flipped
    log_p = z.sub_(reverse_sum)  # log p = z - S
    del reverse_sum
    p = _fill_invisible(log_p.clamp_(min=_LOG_P_FLOOR).exp_(), future, padded, 0.0)
    return p, beta


def _block_backward(
    q_blk: Tensor,
    k_vis: Tensor,
    v_vis: Tensor,
    grad_out_blk: Tensor,
    future: Tensor,
    padded: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block of rows: (dq of the block, dk and dv of the visible keys)."""
    p, beta = _block_weights(q_blk, k_vis, future, padded, with_beta=True)
    dv_vis = torch.matmul(p.transpose(-1, -2), grad_out_blk)
    # u = dL/dlog p = p * (dO . v);  dL/dz = u - beta * cumsum(u)
    u = torch.matmul(grad_out_blk, v_vis.transpose(-1, -2)).mul_(p)
    del p
    dz = u.addcmul_(beta, u.cumsum(-1), value=-1.0)
    del beta
    # z = q_scaled . k: dq = scale * dz @ k, dk = dz^T @ q_scaled.
    dq_blk = torch.matmul(dz, k_vis).mul_(scale)
    dk_vis = torch.matmul(dz.transpose(-1, -2), q_blk)
    return dq_blk, dk_vis, dv_vis


def exact_softplus(z: Tensor) -> Tensor:
    """``log(1 + e^z)`` to full precision for every z, in z's dtype.

    ``F.softplus`` returns z itself above its threshold (20), which drops ``log1p(e^-z)``
    (2e-9 at z = 20): invisible in fp32, but an error of order 1e-9 in fp64, whose
    oracles must be exact. ``logaddexp(z, 0) = max(z, 0) + log1p(e^-|z|)`` is exact and
    cannot overflow.
    """
    return torch.logaddexp(z, z.new_zeros(()))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (gradcheck needs it)."""
    return torch.promote_types(x.dtype, torch.float32)


class _StickBreakingAttention(torch.autograd.Function):
    """Blocked forward, blocked recomputing backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, block_size):  # type: ignore[override]
        B, H, Tq, D = q.shape
        prefix = k.shape[2] - Tq
        dtype = _compute_dtype(q)
        # Fold 1/sqrt(D) into q once instead of scaling every score block.
        q_scaled = q.to(dtype) * (1.0 / math.sqrt(D))
        k32, v32 = k.to(dtype), v.to(dtype)
        future, padded = _invisible_masks(key_padding_mask, block_size, Tq, q.device)
        out = torch.empty(B, H, Tq, v.shape[3], dtype=dtype, device=q.device)
        for r0 in range(0, Tq, block_size):
            r1 = min(r0 + block_size, Tq)
            n_keys = prefix + r1  # rows r0..r1-1 see at most keys 0..n_keys-1
            q_blk, k_vis = q_scaled[:, :, r0:r1], k32[:, :, :n_keys]
            p, _ = _block_weights(q_blk, k_vis, future, padded, with_beta=False)
            out[:, :, r0:r1] = torch.matmul(p, v32[:, :, :n_keys])
            del p  # free it before the next block's scores are allocated
        ctx.save_for_backward(q, k, v, key_padding_mask)
        ctx.block_size = block_size
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # in-place ops: no double backward
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, key_padding_mask = ctx.saved_tensors
        block_size = ctx.block_size
        Tq, D = q.shape[2], q.shape[3]
        prefix = k.shape[2] - Tq
        dtype = _compute_dtype(q)
        scale = 1.0 / math.sqrt(D)
        q_scaled = q.to(dtype) * scale
        k32, v32 = k.to(dtype), v.to(dtype)
        grad_out = grad_out.to(dtype)
        future, padded = _invisible_masks(key_padding_mask, block_size, Tq, q.device)
        dq = torch.empty_like(q_scaled)
        dk = torch.zeros_like(k32)
        dv = torch.zeros_like(v32)
        for r0 in range(0, Tq, block_size):
            r1 = min(r0 + block_size, Tq)
            n_keys = prefix + r1
            dq[:, :, r0:r1], dk_vis, dv_vis = _block_backward(
                q_scaled[:, :, r0:r1],
                k32[:, :, :n_keys],
                v32[:, :, :n_keys],
                grad_out[:, :, r0:r1],
                future,
                padded,
                scale,
            )
            dk[:, :, :n_keys] += dk_vis
            dv[:, :, :n_keys] += dv_vis
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
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(D)  # (B, H, Tq, Tk)
    beta = torch.sigmoid(scores)
    # 1 - beta as sigmoid(-z): exact also where beta rounds to 1 (z > ~37 in fp64).
    keep = torch.sigmoid(-scores)
    t = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # absolute query positions
    j = torch.arange(Tk, device=q.device)[None, :]
    visible = (j <= t)[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    beta = torch.where(visible, beta, torch.zeros_like(beta))  # masked key: beta = 0
    keep = torch.where(visible, keep, torch.ones_like(keep))  # ... and 1 - beta = 1
    # between[t, j, l] = j < l <= t; masked l have 1 - beta = 1, so they break nothing.
    l_idx = torch.arange(Tk, device=q.device)
    between = (j[..., None] < l_idx) & (l_idx <= t[..., None])  # (Tq, Tk, Tk)
    factors = torch.where(between, keep[..., None, :], torch.ones_like(keep[..., None, :]))
    p = beta * factors.prod(dim=-1)  # (B, H, Tq, Tk)
    return (p @ vd).to(q.dtype)

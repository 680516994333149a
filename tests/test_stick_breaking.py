"""Stick-breaking attention: blocked O(T^2) kernel against the literal eqs. 3-4 oracle."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modformer.nn.stick_breaking import (
    stick_breaking_attention,
    stick_breaking_attention_reference,
)


def make_qkv(
    B: int,
    H: int,
    Tq: int,
    Tk: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    score_scale: float = 2.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v; `score_scale` spreads the scores so some sticks break early."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g) * score_scale
    k = torch.randn(B, H, Tk, D, generator=g) * score_scale
    v = torch.randn(B, H, Tk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(B: int, Tk: int, seed: int = 1) -> torch.Tensor:
    """Random holes plus a left-padded first sequence (its first keys are all padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Tk, generator=g) > 0.3
    mask[0, :5] = False
    return mask


def oracle(q, k, v, key_padding_mask=None) -> torch.Tensor:
    return stick_breaking_attention_reference(q.double(), k.double(), v.double(), key_padding_mask)


@pytest.mark.parametrize(
    ("Tq", "Tk", "block_size", "masked"),
    [
        (37, 37, 16, False),  # T not a multiple of the block
        (37, 37, 128, False),  # one block
        (37, 53, 16, False),  # 16-key prefix
        (37, 37, 16, True),  # padding mask
        (37, 53, 16, True),  # prefix and padding mask
        (1, 29, 16, False),  # decoding: one query row
        (1, 29, 16, True),
    ],
)
def test_matches_reference_fp32(Tq, Tk, block_size, masked):
    q, k, v = make_qkv(2, 3, Tq, Tk, 8)
    mask = padding_mask(2, Tk) if masked else None
    out = stick_breaking_attention(q, k, v, mask, block_size=block_size)
    assert out.dtype == torch.float32 and out.shape == (2, 3, Tq, 8)
    torch.testing.assert_close(out.double(), oracle(q, k, v, mask), atol=1e-5, rtol=0)


def test_block_size_does_not_change_the_result():
    q, k, v = make_qkv(1, 2, 45, 60, 8)
    mask = padding_mask(1, 60)
    outs = [stick_breaking_attention(q, k, v, mask, block_size=bs) for bs in (1, 7, 16, 512)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)


def test_padded_keys_neither_attend_nor_break_the_stick():
    """Inserting padded keys with garbage k/v changes nothing for the real tokens."""
    q, k, v = make_qkv(1, 2, 12, 12, 8)
    real = torch.tensor(
        [True, True, False, True, False, False, True, True, True, False] + [True] * 2
    )
    out_padded = stick_breaking_attention(q, k, v, real[None], block_size=4)
    idx = real.nonzero().squeeze(1)
    out_dense = stick_breaking_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], block_size=4)
    torch.testing.assert_close(out_padded[:, :, idx], out_dense, atol=1e-6, rtol=0)


def test_query_with_no_visible_key_returns_zero():
    q, k, v = make_qkv(2, 2, 10, 10, 4)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False  # left padding: rows 0-2 of sequence 0 see no real key
    out = stick_breaking_attention(q, k, v, mask, block_size=4)
    assert torch.isfinite(out).all()
    assert out[0, :, :3].abs().max() == 0


def test_weights_pick_the_latest_match():
    """Identical, strongly matching keys: the stick is spent on the most recent one."""
    D = 4
    q = torch.full((1, 1, 1, D), 10.0)
    k = torch.full((1, 1, 6, D), 10.0)  # z = 200 for every key: beta ~ 1
    v = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 1, 6, D)
    out = stick_breaking_attention(q, k, v)
    torch.testing.assert_close(out, torch.full((1, 1, 1, D), 5.0))


def test_weights_are_subnormalised():
    """sum_j p_{j,t} <= 1 (leftover stick dropped): with v = 1 every output is in [0, 1]."""
    q, k, _ = make_qkv(2, 2, 30, 30, 8, score_scale=0.3)
    ones = torch.ones(2, 2, 30, 3)
    out = stick_breaking_attention(q, k, ones, block_size=8)
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()
    # Row 0 sees only key 0: its total weight is beta_00 = sigmoid(z_00), not 1.
    beta_00 = torch.sigmoid((q[:, :, 0] * k[:, :, 0]).sum(-1) / 8**0.5)
    torch.testing.assert_close(out[:, :, 0], beta_00[..., None].expand(2, 2, 3))


def test_large_scores_stay_finite():
    q, k, v = make_qkv(1, 2, 20, 20, 8, score_scale=30.0)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = stick_breaking_attention(q, k, v, padding_mask(1, 20), block_size=8)
    out.square().sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(
        out.double(), oracle(q, k, v, padding_mask(1, 20)), atol=1e-4, rtol=0
    )


def large_score_qkv(Tq: int, Tk: int, seed: int = 0):
    """fp64 q, k, v with head_dim 1 and scores q_t * k_j spread over [-50, 50]."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(1, 2, Tq, 1, generator=g) < 0.5, -1.0, 1.0)
    q = sign * (0.5 + 0.5 * torch.rand(1, 2, Tq, 1, generator=g))
    k = 100.0 * torch.rand(1, 2, Tk, 1, generator=g) - 50.0
    v = torch.randn(1, 2, Tk, 1, generator=g)
    return q.double(), k.double(), v.double()


@pytest.mark.parametrize("masked", [False, True])
def test_fp64_with_scores_up_to_50_matches_the_reference_exactly(masked):
    # A softplus that drops log1p(e^-z) above z = 20 (F.softplus) is off by up to 2e-9.
    q, k, v = large_score_qkv(24, 30)
    scores = (q @ k.transpose(-1, -2)).abs()
    assert scores.max() > 45 and ((scores > 20) & (scores < 25)).sum() > 5
    mask = padding_mask(1, 30) if masked else None
    out = stick_breaking_attention(q, k, v, mask, block_size=8)
    ref = stick_breaking_attention_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("Tq", "Tk", "masked"),
    [(7, 7, False), (7, 11, False), (7, 7, True), (7, 11, True), (1, 6, True)],
)
def test_gradcheck_fp64(Tq, Tk, masked):
    q, k, v = make_qkv(2, 2, Tq, Tk, 4, dtype=torch.float64, score_scale=1.0)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    mask = padding_mask(2, Tk) if masked else None
    # block_size=3 exercises several blocks and a ragged last block.
    assert torch.autograd.gradcheck(
        lambda q, k, v: stick_breaking_attention(q, k, v, mask, block_size=3), (q, k, v)
    )


def test_gradients_match_reference_autograd():
    q, k, v = make_qkv(2, 3, 37, 45, 8)
    mask = padding_mask(2, 45)
    upstream = torch.randn(2, 3, 37, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn, dtype in ((stick_breaking_attention, torch.float32), (oracle, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, mask) if fn is oracle else fn(*leaves, mask, block_size=16)
        (out * upstream.to(dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)


def test_bf16_is_finite_and_close_to_fp32():
    q, k, v = make_qkv(2, 4, 64, 64, 16, score_scale=0.5)
    out32 = stick_breaking_attention(q, k, v, block_size=16)
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    out16 = stick_breaking_attention(qb, kb, vb, block_size=16)
    assert out16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all()
    # bf16 rounds inputs and output (~3 significant digits); the log-space sums run in fp32.
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)
    out16.float().sum().backward()
    assert qb.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad).all() for t in (qb, kb, vb))


@pytest.mark.parametrize("masked", [False, True])
def test_incremental_rows_equal_full_computation(masked):
    """Decoding one row at a time against the growing prefix reproduces the full pass."""
    q, k, v = make_qkv(2, 2, 20, 20, 8)
    mask = padding_mask(2, 20) if masked else None
    full = stick_breaking_attention(q, k, v, mask, block_size=8)
    rows = []
    for t in range(20):
        step_mask = None if mask is None else mask[:, : t + 1]
        rows.append(
            stick_breaking_attention(
                q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], step_mask
            )
        )
    torch.testing.assert_close(torch.cat(rows, dim=2), full, atol=1e-6, rtol=0)
    # Chunked prompt processing (a prefix of 12, then 8 rows) agrees too.
    chunk = stick_breaking_attention(q[:, :, 12:], k, v, mask, block_size=3)
    torch.testing.assert_close(chunk, full[:, :, 12:], atol=1e-6, rtol=0)


def test_backward_saves_no_score_matrix():
    """Only q, k, v (and the mask) are kept for backward: nothing of size T x T."""
    B, H, T, D = 1, 2, 64, 4
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, T, T, D))
    saved_numel = []

    def pack(t):
        saved_numel.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stick_breaking_attention(q, k, v, torch.ones(B, T, dtype=torch.bool), block_size=16)
    assert sum(saved_numel) <= 3 * B * H * T * D + B * T
    assert max(saved_numel) < T * T


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "mask_shape", "block_size", "message"),
    [
        ((2, 3, 5), (2, 3, 5, 4), (2, 3, 5, 4), None, 16, "4-D"),
        ((2, 3, 5, 4), (2, 2, 5, 4), (2, 2, 5, 4), None, 16, "batch, heads"),
        ((2, 3, 5, 4), (2, 3, 5, 8), (2, 3, 5, 8), None, 16, "head_dim"),
        ((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 6, 4), None, 16, "one row per key"),
        ((2, 3, 6, 4), (2, 3, 5, 4), (2, 3, 5, 4), None, 16, "Tk >= Tq"),
        ((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4), (2, 4), 16, "key_padding_mask"),
        ((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4), None, 0, "block_size"),
    ],
)
def test_bad_inputs_raise_value_error(q_shape, k_shape, v_shape, mask_shape, block_size, message):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        stick_breaking_attention(q, k, v, mask, block_size=block_size)


def test_bad_mask_dtype_and_mixed_dtypes_raise_value_error():
    q, k, v = make_qkv(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="bool"):
        stick_breaking_attention(q, k, v, torch.ones(1, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        stick_breaking_attention(q, k.double(), v)


def _load_bench():
    """bench/stick_breaking.py (a script, not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "bench" / "stick_breaking.py"
    spec = importlib.util.spec_from_file_location("bench_stick_breaking", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_official_formulation_matches_reference():
    """The O(T^3) baseline in bench/stick_breaking.py computes the same function."""
    bench = _load_bench()
    q, k, v = make_qkv(2, 3, 21, 30, 8)
    out = bench.official_stick_breaking(q, k, v)
    torch.testing.assert_close(out.double(), oracle(q, k, v), atol=1e-5, rtol=0)


def test_matmul_flops_grow_quadratically():
    """No T x T matmul for the cumulative sum: doubling T at most ~4x the FLOPs (fwd+bwd)."""

    def flops(fn, T: int) -> int:
        q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, T, T, 4))
        with FlopCounterMode(display=False) as counter:
            fn(q, k, v).sum().backward()
        return counter.get_total_flops()

    ours = lambda q, k, v: stick_breaking_attention(q, k, v, block_size=32)  # noqa: E731
    assert flops(ours, 256) / flops(ours, 128) < 4.2
    # Control: the counter does see the O(T^3) triangular matmul of the official form.
    official = _load_bench().official_stick_breaking
    assert flops(official, 256) / flops(official, 128) > 6


def test_long_rows_match_official_formulation_fp64():
    """Rows long enough that most log-weights fall below the exp() floor of -80."""
    q, k, v = make_qkv(1, 2, 150, 250, 8)
    out = stick_breaking_attention(q, k, v, block_size=64)
    official = _load_bench().official_stick_breaking
    ref = official(q.double(), k.double(), v.double())  # O(T^2) memory: fine at T = 250
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)

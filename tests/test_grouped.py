import pytest
import torch

from modformer.nn.grouped import grouped_linear, make_dispatch


def _dense_reference(x, idx, w, b):
    """Per (token, slot) loop: the obvious definition."""
    T, k = idx.shape
    out = torch.zeros(T, k, w.shape[2], dtype=x.dtype)
    for t in range(T):
        for s in range(k):
            e = int(idx[t, s])
            if 0 <= e < w.shape[0]:
                out[t, s] = x[t] @ w[e] + b[e]
    return out


def _sparse(x, idx, w, b):
    T, k = idx.shape
    d = make_dispatch(idx, w.shape[0])
    y = grouped_linear(x[d.token_index], w, d.offsets, b)
    return (
        torch.zeros(T * k, w.shape[2], dtype=x.dtype).index_copy(0, d.slot_index, y).view(T, k, -1)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_matches_loop_with_left_out_pairs(dtype):
    torch.manual_seed(0)
    T, k, E, d, f = 40, 2, 5, 8, 16
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, E + 1, (T, k))  # value E = a left-out (SKIP) choice
    idx[0] = E  # a token that selects nothing
    w = torch.randn(E, d, f, dtype=dtype, requires_grad=True)
    b = torch.randn(E, f, dtype=dtype, requires_grad=True)
    out, ref = _sparse(x, idx, w, b), _dense_reference(x, idx, w, b)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert torch.all(out[0] == 0)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, atol=tol * 10, rtol=tol * 10)


def test_grouped_linear_gradcheck_fp64():
    torch.manual_seed(1)
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 4, (12, 2))
    w = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _sparse(x, idx, w, b), (x, w, b))


def test_empty_groups_and_sum_backward():
    # All tokens pick expert 2: groups 0 and 1 are empty; y.sum() gives a stride-0 gradient.
    x = torch.randn(6, 8, requires_grad=True)
    idx = torch.full((6, 1), 2)
    w = torch.randn(3, 8, 4, requires_grad=True)
    d = make_dispatch(idx, 3)
    y = grouped_linear(x[d.token_index], w, d.offsets)
    y.sum().backward()
    torch.testing.assert_close(y, x @ w[2])
    assert torch.all(w.grad[:2] == 0)


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="expected x"):
        grouped_linear(
            torch.randn(3, 4), torch.randn(2, 5, 6), torch.tensor([1, 3], dtype=torch.int32)
        )

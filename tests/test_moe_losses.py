"""Routing losses against closed forms and direct formulas (ModuleFormer sec. 4)."""

from __future__ import annotations

import math

import pytest
import torch

from modformer.nn.moe_losses import (
    conditional_entropy,
    expert_load,
    load_concentration_loss,
    marginal_entropy,
    mutual_information_loss,
    router_z_loss,
    switch_load_balancing_loss,
    switch_loss,
)
from modformer.nn.moe_losses import (
    routing_regularization as routing_reg,
)

# Two real tokens over three experts; softmax(log P) = P exactly.
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], dtype=torch.float64)
# H(m|x) = 1.5 ln 2 for both rows; p(m) = (3/8, 3/8, 1/4).
H_COND = 1.5 * math.log(2)
H_MARG = -(2 * 0.375 * math.log(0.375) + 0.25 * math.log(0.25))


def with_padding(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert a padding row with extreme logits between the real rows."""
    garbage = torch.tensor([[30.0, -30.0, 0.0]], dtype=logits.dtype)
    padded = torch.cat([logits[:1], garbage, logits[1:]])
    return padded, torch.tensor([True, False, True])


def test_mutual_information_closed_form():
    logits = PROBS.log()
    torch.testing.assert_close(conditional_entropy(logits), torch.tensor(H_COND).double())
    torch.testing.assert_close(marginal_entropy(logits), torch.tensor(H_MARG).double())
    expected = torch.tensor(-H_MARG + H_COND).double()
    torch.testing.assert_close(mutual_information_loss(logits), expected)
    # Padding rows are excluded from both p(m) and the mean conditional entropy.
    padded, mask = with_padding(logits)
    torch.testing.assert_close(mutual_information_loss(padded, mask), expected)
    assert not torch.allclose(mutual_information_loss(padded), expected)


def test_mutual_information_extremes():
    """Minimum -log N for confident tokens spread over all experts; 0 for uniform routing."""
    n = 4
    one_hot_logits = torch.eye(n) * 50.0
    torch.testing.assert_close(
        mutual_information_loss(one_hot_logits), torch.tensor(-math.log(n)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(mutual_information_loss(torch.zeros(6, n)), torch.tensor(0.0))


def test_entropies_have_finite_gradients_with_saturated_routers():
    logits = torch.tensor([[200.0, -200.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    (mutual_information_loss(logits) + load_concentration_loss(logits)).backward()
    assert torch.isfinite(logits.grad).all()


def test_load_concentration_is_marginal_entropy():
    logits = PROBS.log()
    torch.testing.assert_close(load_concentration_loss(logits), torch.tensor(H_MARG).double())
    padded, mask = with_padding(logits)
    torch.testing.assert_close(load_concentration_loss(padded, mask), torch.tensor(H_MARG).double())


def test_switch_balance_and_z_loss_direct_formulas():
    torch.manual_seed(0)
    T, N, k = 10, 5, 2
    logits = torch.randn(T, N, dtype=torch.float64) * 2
    top_k = logits.topk(k, dim=-1).indices
    # Direct formulas with explicit loops.
    counts = torch.zeros(N, dtype=torch.float64)
    for t in range(T):
        for s in range(k):
            counts[top_k[t, s]] += 1
    f = counts / (T * k)
    P = torch.softmax(logits, -1).mean(0)
    expected_balance = N * (f * P).sum()
    expected_z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    torch.testing.assert_close(switch_load_balancing_loss(logits, top_k), expected_balance)
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected_z).double())
    torch.testing.assert_close(
        switch_loss(logits, top_k, z_loss_coef=0.1), expected_balance + 0.1 * expected_z
    )
    # Uniform router and perfectly even assignments: the balance loss is exactly 1.
    even = torch.arange(N).repeat(2)[:, None]
    torch.testing.assert_close(
        switch_load_balancing_loss(torch.zeros(2 * N, N), even), torch.tensor(1.0)
    )


def test_switch_losses_exclude_padding():
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    top_k = logits.topk(2, dim=-1).indices
    mask = torch.tensor([True, True, False, True, False, True])
    real = mask.nonzero().squeeze(1)
    torch.testing.assert_close(
        switch_loss(logits, top_k, mask), switch_loss(logits[real], top_k[real])
    )
    torch.testing.assert_close(router_z_loss(logits, mask), router_z_loss(logits[real]))


def test_z_loss_closed_form():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected).double())


def test_expert_load_fractions():
    top_k = torch.tensor([[0, 1], [0, 2], [3, 0], [1, 2]])
    load = expert_load(top_k, 5)
    torch.testing.assert_close(load, torch.tensor([0.75, 0.5, 0.5, 0.25, 0.0]))
    mask = torch.tensor([True, True, False, False])
    torch.testing.assert_close(expert_load(top_k, 5, mask), torch.tensor([1.0, 0.5, 0.5, 0, 0]))


def test_routing_regularization_is_squared_norm_of_new_rows():
    A = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], requires_grad=True)
    n_old = 1
    loss = routing_reg(A[n_old:])
    torch.testing.assert_close(loss, torch.tensor(9.0 + 1.0 + 0.25 + 0.25))
    loss.backward()
    torch.testing.assert_close(A.grad, torch.tensor([[0.0, 0.0], [6.0, -2.0], [1.0, 1.0]]))
    assert routing_reg(A[3:]).item() == 0.0


def test_bad_mask_shape_is_clear():
    with pytest.raises(ValueError, match="token_mask"):
        mutual_information_loss(torch.zeros(4, 3), torch.ones(2, 2, dtype=torch.bool))

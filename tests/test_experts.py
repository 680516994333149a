"""The experts module (nn/experts.py): the loop backend is the definition (checked against
per-(token, pick) Python loops), the grouped backend must agree with it (forward and
gradients, fp32 and fp64, with unused experts, empty groups, SKIP and padding), and whole
MoM / ModuleFormer models give the same losses and gradients with either backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.nn.experts import (
    Experts,
    GroupedPairs,
    LoopPairs,
    NormedLinear,
    experts_backend,
)
from modformer.nn.moe import SparseMoE

# fp32: the two backends run different kernels (one GEMM per expert vs a grouped GEMM,
# a weighted sum vs a batched product), so they agree to rounding; fp64: to ~1e-12.
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}

E, K, N_TOKENS, D, F_OUT = 5, 2, 23, 8, 12


def picks(seed: int = 0) -> torch.Tensor:
    """(N_TOKENS, K) expert picks: expert 3 is never picked, expert 1 rarely; value E is
    SKIP and -1 no expert either; token 0 picks nothing, token 1 picks expert 1 twice."""
    g = torch.Generator().manual_seed(seed)
    index = torch.tensor([0, 2, 4, E])[torch.randint(0, 4, (N_TOKENS, K), generator=g)]
    index[0] = E
    index[1] = 1
    index[2, 0] = -1
    return index


def operands(dtype: torch.dtype, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    x = leaf(N_TOKENS, D)
    weight, b = leaf(E, D, F_OUT), leaf(E, F_OUT) if bias else None
    ln_w, ln_b = leaf(E, D), leaf(E, D) if bias else None
    gates = torch.rand(N_TOKENS, K, generator=g, dtype=dtype)
    return x, weight, b, ln_w, ln_b, gates


def both_backends(index, gates):
    return {
        "loop": LoopPairs(index, gates, E),
        "grouped": GroupedPairs(index, gates, E),
    }


def per_pick_reference(x, index, fn) -> torch.Tensor:
    """(N_TOKENS, K, f): fn(e, x_t) for each (token, pick) with an expert, else 0."""
    rows = [
        [fn(int(e), x[t]) if 0 <= int(e) < E else None for e in index[t]] for t in range(x.shape[0])
    ]
    f = next(r for row in rows for r in row if r is not None).shape[-1]
    zero = x.new_zeros(f)
    return torch.stack([torch.stack([zero if r is None else r for r in row]) for row in rows])


def grads_of(out: torch.Tensor, inputs, seed: int = 1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, g, allow_unused=True, materialize_grads=True)


def assert_close_all(a, b, tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


# ---- the loop backend is the definition -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loop_backend_is_the_per_pick_definition(dtype):
    x, weight, b, ln_w, ln_b, gates = operands(dtype)
    index = picks()
    pairs = LoopPairs(index, gates, E)
    linear = pairs.slot_order(pairs.linear(pairs.gather(x), weight, b)).view(N_TOKENS, K, -1)
    ref = per_pick_reference(x, index, lambda e, row: row @ weight[e] + b[e])
    torch.testing.assert_close(linear, ref, atol=TOL[dtype], rtol=TOL[dtype])

    normed = NormedLinear(ln_w, ln_b, weight, b, eps=1e-5)
    got = pairs.slot_order(pairs.normed_linear(x, normed)).view(N_TOKENS, K, -1)
    ref = per_pick_reference(
        x, index, lambda e, row: F.layer_norm(row, (D,), ln_w[e], ln_b[e], 1e-5) @ weight[e] + b[e]
    )
    torch.testing.assert_close(got, ref, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)

    summed = pairs.linear_sum(pairs.gather(x), weight, b)
    ref_sum = gates[:, :, None] * per_pick_reference(x, index, lambda e, r: r @ weight[e] + b[e])
    torch.testing.assert_close(summed, ref_sum.sum(1), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.all(summed[0] == 0), "a token without experts gets exactly 0"


# ---- the grouped backend agrees with it -------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backends_agree_on_every_operation(dtype, bias):
    x, weight, b, ln_w, ln_b, gates = operands(dtype, bias)
    params = (x, weight, b, ln_w, ln_b)
    results = {}
    for name, pairs in both_backends(picks(), gates).items():
        normed = NormedLinear(ln_w, ln_b, weight, b, eps=1e-5)
        outputs = {
            "linear": pairs.slot_order(pairs.linear(pairs.gather(x), weight, b)),
            "linear_sum": pairs.linear_sum(pairs.gather(x), weight, b),
            "normed": pairs.slot_order(pairs.normed_linear(x, normed)),
            "combine": pairs.combine(pairs.pair_order(x.repeat_interleave(K, 0)), weighted=True),
            "sum": pairs.combine(pairs.pair_order(x.repeat_interleave(K, 0)), weighted=False),
        }
        results[name] = {k: (v, grads_of(v, params)) for k, v in outputs.items()}
    tol = TOL[dtype]
    for op, (loop_out, loop_grads) in results["loop"].items():
        grouped_out, grouped_grads = results["grouped"][op]
        torch.testing.assert_close(grouped_out, loop_out, atol=tol, rtol=tol, msg=op)
        assert_close_all(grouped_grads, loop_grads, 2 * tol)
    # Left-out pairs are exactly zero in both backends, and so are unused experts' grads.
    for name in ("loop", "grouped"):
        linear, grads = results[name]["linear"]
        assert torch.all(linear.view(N_TOKENS, K, -1)[0] == 0), name
        assert torch.all(grads[1][3] == 0), f"{name}: expert 3 is never picked"


def test_grouped_backend_keeps_fp64_gradcheck():
    x, weight, b, *_ = operands(torch.float64)
    gates = torch.rand(N_TOKENS, K, dtype=torch.float64).requires_grad_()
    pairs = GroupedPairs(picks(), gates, E)

    def f(x, weight, b, gates):
        pairs.weight = gates
        return pairs.linear_sum(pairs.gather(x), weight, b)

    assert torch.autograd.gradcheck(f, (x, weight, b, gates))


def test_all_pairs_in_one_expert_leave_the_others_empty():
    x, weight, b, *_, gates = operands(torch.float32)
    index = torch.full((N_TOKENS, K), 2)
    outs = [p.linear_sum(p.gather(x), weight, b) for p in both_backends(index, gates).values()]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=2e-6)
    ref = gates.sum(1, keepdim=True) * (x @ weight[2] + b[2])
    torch.testing.assert_close(outs[0], ref, atol=2e-6, rtol=2e-6)


# ---- choosing the backend ---------------------------------------------------------------


def test_backend_from_constructor_and_context_manager():
    layer = Experts(4)
    assert layer.backend == "grouped" == layer.active_backend
    index = torch.zeros(3, 1, dtype=torch.long)
    assert isinstance(layer.route(index), GroupedPairs)
    with experts_backend("loop"):
        assert isinstance(layer.route(index), LoopPairs)
        with experts_backend("grouped"):
            assert layer.active_backend == "grouped"
        assert layer.active_backend == "loop"
    assert layer.active_backend == "grouped"
    assert isinstance(Experts(4, backend="loop").route(index), LoopPairs)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="experts backend 'fast' is unknown"):
        Experts(4, backend="fast")
    with pytest.raises(ValueError, match="choose one of"), experts_backend("fast"):
        pass


def test_padding_tokens_pick_no_expert_in_both_backends():
    torch.manual_seed(0)
    moe = SparseMoE(16, num_experts=6, top_k=2, hidden_size=24, router_hidden=8)
    x = torch.randn(10, 16)
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 7]] = False
    outs = {}
    for backend in ("loop", "grouped"):
        with experts_backend(backend):
            outs[backend] = moe(x, mask)[0]
    torch.testing.assert_close(outs["grouped"], outs["loop"], atol=2e-6, rtol=2e-6)
    assert torch.all(outs["loop"][[0, 7]] == 0)


# ---- whole models -----------------------------------------------------------------------


def spread_out(model: torch.nn.Module) -> torch.nn.Module:
    """Large router weights and embeddings, nonzero biases: routers pick different modules
    per token (and SKIP for some), and a misplaced bias or LN affine shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or "wte" in name or "wpe" in name:
                p.normal_(0.0, 1.0)
            elif "bias" in name or "ln_weight" in name:
                p.normal_(0.5 if "ln_weight" in name else 0.0, 0.3)
    return model


def mom(**kw) -> MoMForCausalLM:
    torch.manual_seed(0)
    config = MoMConfig(
        vocab_size=41, n_positions=32, n_embd=16, n_head=2, router_dim=8, chunks="[1-3-1]", **kw
    )
    return spread_out(MoMForCausalLM(config))


def moduleformer(**kw) -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    base = dict(
        vocab_size=41,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_att_experts=4,
        att_hidden=16,
        n_head=2,
        k_att=2,
        n_ffd_experts=5,
        ffd_hidden=24,
        k_ffd=2,
        router_hidden=8,
        attention_block_size=8,
    )
    return spread_out(ModuleFormerForCausalLM(ModuleFormerConfig(**{**base, **kw})))


def loss_and_grads(model, ids, mask, backend):
    model.zero_grad()
    with experts_backend(backend):
        out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


MODELS = {
    "mom-K2H3": lambda: mom(K=2, H=3),
    "mom-K1H3S": lambda: mom(K=1, H=3, skip=True),
    "mom-zero-key-unweighted": lambda: mom(
        K=2, H=2, skip=True, all_skip_tokens="zero_key", weighted_qkv=False
    ),
    "mom-same": lambda: mom(K=2, H=2, skip=True, mom_same=True),
    "mom-no-bias": lambda: mom(K=2, H=2, bias=False),
    "moduleformer": moduleformer,
    "jetmoe-style": lambda: moduleformer(
        expert_mlp="swiglu",
        activation_function="silu",
        router_type="linear",
        attention_type="softmax_rope",
        moe_output_bias=True,
    ),
    "moduleformer-inserted": lambda: moduleformer(
        n_inserted_att_experts=1, n_inserted_ffd_experts=2
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(MODELS))
def test_models_have_equal_losses_and_gradients_with_both_backends(name, dtype):
    model = MODELS[name]().to(dtype).train()
    ids = torch.randint(0, 41, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: padding tokens pick no expert
    loss, logits, grads = loss_and_grads(model, ids, mask, "grouped")
    loop_loss, loop_logits, loop_grads = loss_and_grads(model, ids, mask, "loop")
    tol = {torch.float32: 1e-5, torch.float64: 1e-11}[dtype]
    torch.testing.assert_close(loop_loss, loss, atol=tol, rtol=tol)
    torch.testing.assert_close(loop_logits, logits, atol=tol, rtol=tol)
    assert loop_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(loop_grads[n], grads[n], atol=tol, rtol=tol, msg=n)

"""ModuleFormer's JetMoE options: RoPE softmax attention (fast vs equations), RMSNorm,
SwiGLU experts, the linear router; and softmax_rope models that cache, pad, generate,
carry history and train like the stick-breaking ones."""

from __future__ import annotations

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers.cache_utils import DynamicCache

from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.nn.moe import SparseMoE, TopKRouter
from modformer.nn.norms import RMSNorm
from modformer.nn.rope_attention import (
    apply_rotary,
    positions_from_mask,
    rotary_cos_sin,
    softmax_attention,
    softmax_attention_reference,
)

VOCAB = 64
JETMOE_OPTIONS = dict(
    norm_type="rms",
    expert_mlp="swiglu",
    router_type="linear",
    attention_type="softmax_rope",
    moe_output_bias=True,
    activation_function="silu",
)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rope_model(seed: int = 0, **overrides) -> ModuleFormerForCausalLM:
    settings = dict(vocab_size=VOCAB, n_layer=2, attention_block_size=8, **JETMOE_OPTIONS)
    torch.manual_seed(seed)
    model = ModuleFormerForCausalLM(
        ModuleFormerConfig.from_preset("tiny", **{**settings, **overrides})
    ).eval()
    with torch.no_grad():  # non-trivial biases and norm weights
        for name, p in model.named_parameters():
            if name.endswith("output_bias"):
                p.normal_(std=0.02)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- building blocks


def test_sdpa_path_matches_the_equations_with_prefix_and_padding():
    g = torch.Generator().manual_seed(0)
    B, H, Tq, Tk, D = 2, 3, 5, 9, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Tq, Tk, Tk))
    for t in (q, k, v):
        t.requires_grad_(True)
    mask = torch.ones(B, Tk, dtype=torch.bool)
    mask[1, :3] = False  # row 1 left-padded in the prefix
    mask[0, 6] = False  # and a padded key among row 0's current tokens
    for key_padding_mask in (None, mask):
        fast = softmax_attention(q, k, v, key_padding_mask)
        ref = softmax_attention_reference(q, k, v, key_padding_mask)
        torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
        grads_fast = torch.autograd.grad(fast.square().sum(), (q, k, v))
        grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(grads_fast, grads_ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # Without a prefix or mask SDPA takes its fused causal path: still the equations.
    torch.testing.assert_close(
        softmax_attention(q, q, v[:, :, :Tq]),
        softmax_attention_reference(q, q, v[:, :, :Tq]),
        atol=1e-12,
        rtol=0,
    )


def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency():
    D, theta = 8, 100.0
    x = torch.randn(1, 1, 4, D, dtype=torch.float64)
    positions = torch.tensor([[0, 3, 7, 11]])
    cos, sin = rotary_cos_sin(positions, D, theta, torch.float64)
    rotated = apply_rotary(x, cos, sin)
    # As complex numbers: (x_i + i x_{i+D/2}) * exp(i * p * theta^(-2i/D)).
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    expected = z * torch.exp(1j * positions[0, :, None].double() * freq)
    torch.testing.assert_close(rotated[..., : D // 2], expected.real)
    torch.testing.assert_close(rotated[..., D // 2 :], expected.imag)
    # Scores depend on the positions only through their difference.
    q, k = torch.randn(2, 1, 1, 1, D, dtype=torch.float64).unbind(0)

    def score(tq, tk):
        cq, sq = rotary_cos_sin(torch.tensor([[tq]]), D, theta, torch.float64)
        ck, sk = rotary_cos_sin(torch.tensor([[tk]]), D, theta, torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(9, 4), score(25, 20))


def test_positions_count_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    assert positions_from_mask(mask, 5, mask.device).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(None, 3, mask.device).tolist() == [[0, 1, 2]]


def test_rms_norm_matches_the_definition():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expected = norm.weight * x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)


def test_linear_router_renormalises_the_top_k_logits():
    torch.manual_seed(0)
    router = TopKRouter(12, 5, 2, hidden_size=99, router_type="linear")
    assert router.input_proj is None and router.expert_embedding.in_features == 12
    x = torch.randn(7, 12)
    route = router(x)
    logits = x @ router.expert_embedding.weight.T
    kept, idx = logits.topk(2, dim=-1)
    assert torch.equal(route.indices, idx)
    torch.testing.assert_close(route.weights, torch.softmax(kept, -1))
    torch.testing.assert_close(route.probs, torch.softmax(logits, -1))
    torch.testing.assert_close(route.weights.sum(-1), torch.ones(7))


def test_swiglu_experts_match_a_dense_loop():
    torch.manual_seed(1)
    n_embd, hidden, E, k = 8, 6, 4, 2
    moe = SparseMoE(
        n_embd, E, k, hidden, "silu", router_type="linear", expert_mlp="swiglu", output_bias=True
    )
    with torch.no_grad():
        moe.output_bias.normal_()
    assert moe.w_in.shape == (E, n_embd, 2 * hidden)
    x = torch.randn(2, 5, n_embd)
    y, route = moe(x)
    flat = x.reshape(-1, n_embd)
    expected = moe.output_bias.expand(flat.shape[0], -1).clone()
    for t in range(flat.shape[0]):
        for gate, e in zip(route.weights[t], route.indices[t]):
            h = flat[t] @ moe.w_in[e]
            expert = (torch.nn.functional.silu(h[:hidden]) * h[hidden:]) @ moe.w_out[e]
            expected[t] += gate * expert
    torch.testing.assert_close(y.reshape(-1, n_embd), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the causal LM


def test_cache_in_two_steps_equals_one_full_forward_with_left_padding():
    model = rope_model(seed=1)
    x = tokens(2, 9, seed=1)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    full = model(x, attention_mask=mask, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    first = model(x[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
    second = model(x[:, 5:], attention_mask=mask, past_key_values=cache, use_cache=True)
    stepwise = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
    # A left-padded row equals the same tokens alone (positions start at its first token).
    alone = model(x[1:, 4:], use_cache=False).logits
    torch.testing.assert_close(full[1:, 4:], alone, atol=1e-5, rtol=0)


def _argmax_loop(model, prompt: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache): the reference of generate()."""
    seq, mask = prompt, mask
    for _ in range(steps):
        logits = model(seq, attention_mask=mask, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq[:, prompt.shape[1] :]


@pytest.mark.parametrize("left_padding", [False, True], ids=["plain", "left_padded"])
def test_cached_greedy_generate_equals_an_argmax_loop_of_full_forwards(left_padding):
    # Untied: a tiny tied model mostly repeats its last token, which would test little.
    model = rope_model(seed=2, tie_word_embeddings=False)
    prompt = tokens(2, 7, seed=2)
    mask = torch.ones(2, 7, dtype=torch.long)
    if left_padding:
        prompt[1, :3] = 0
        mask[1, :3] = 0
    expected = _argmax_loop(model, prompt, mask, steps=6)
    assert len(expected.unique()) > 3, expected  # a varied continuation
    out = model.generate(
        prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out[:, prompt.shape[1] :], expected)


def test_history_second_segment_equals_one_long_sequence():
    # The memory holds unrotated keys, rotated at their place in each new window.
    model = rope_model(seed=3, use_history=True)
    T = 6
    x = tokens(2, 2 * T, seed=3)
    mask = torch.ones(2, 2 * T, dtype=torch.long)
    mask[1, :2] = 0
    first = model(x[:, :T], attention_mask=mask[:, :T], use_cache=False)
    second = model(x[:, T:], attention_mask=mask[:, T:], memory=first.memory)
    whole = model(x, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(second.logits, whole.logits[:, T:], atol=1e-5, rtol=0)


def test_explicit_position_ids_replace_the_mask_positions():
    model = rope_model(seed=4)
    x = tokens(1, 5, seed=4)
    shifted = model(x, position_ids=torch.arange(10, 15)[None], use_cache=False).logits
    plain = model(x, use_cache=False).logits
    # RoPE is relative: a common shift of every position changes nothing ...
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)
    # ... but other relative positions do.
    spread = model(x, position_ids=torch.arange(0, 10, 2)[None], use_cache=False).logits
    assert (spread - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one position per input token"):
        model(x, position_ids=torch.arange(4)[None], use_cache=False)


@pytest.mark.parametrize(
    "options",
    [
        {**JETMOE_OPTIONS, "aux_loss_type": "switch_pooled", "n_ffd_experts": 4},
        {"attention_type": "softmax_rope"},  # the Table 4 baseline: MI loss, GELU experts
    ],
    ids=["jetmoe", "table4_softmax_rope"],
)
def test_a_few_training_steps_reduce_the_loss(options):
    torch.manual_seed(8)
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=VOCAB, n_layer=2, **options)
    model = ModuleFormerForCausalLM(config).train()
    x = tokens(1, 8, seed=8).repeat(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model(input_ids=x, labels=x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_forward_and_backward_make_no_host_syncs(monkeypatch):
    model = rope_model(seed=9, use_history=True).train()
    x = tokens(2, 10, seed=9)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    memory = model(input_ids=x, attention_mask=mask, labels=x).memory

    def host_sync(*args, **kwargs):
        raise AssertionError("host sync in the forward/backward pass")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    out = model(input_ids=x, attention_mask=mask, labels=x, memory=memory)
    out.loss.backward()
    monkeypatch.undo()
    assert math.isfinite(out.loss.item())


def test_cost_accounting_counts_the_linear_router():
    from modformer.eval.costs import inference_flops

    model = rope_model(seed=10)
    report = inference_flops(model, tokens(2, 6, seed=10))
    n_embd, n_att, n_ffd = 128, 4, 8  # the tiny preset: A is (experts, n_embd), no B
    assert report.components["router"] == 12 * 2 * 2 * n_embd * (n_att + n_ffd)


def test_pooled_switch_loss_of_a_pruned_router_counts_at_the_unpruned_slots():
    from modformer.nn.moe_losses import pooled_switch_loss

    g = torch.Generator().manual_seed(11)
    full = [torch.randn(9, 4, generator=g) for _ in range(2)]
    full[1][:, 2] = float("-inf")  # router 1's expert 2 is never chosen: prune it
    top = [z.topk(2, dim=-1).indices for z in full]
    kept = torch.tensor([0, 1, 3])
    pruned_logits = [full[0], full[1][:, kept]]
    pruned_top = [top[0], torch.searchsorted(kept, top[1])]  # choice index among kept
    mask = torch.ones(9, dtype=torch.bool)
    mask[:2] = False
    expected = pooled_switch_loss(full, top, mask)
    got = pooled_switch_loss(pruned_logits, pruned_top, mask, [None, (kept, 4)])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="one expert count"):
        pooled_switch_loss(pruned_logits, pruned_top, mask)
    # A pruned JetMoE-style model trains with it.
    model = rope_model(
        seed=11,
        n_ffd_experts=4,
        aux_loss_type="switch_pooled",
        att_experts_per_layer=[3, 4],
        att_expert_slots=[[0, 1, 3], [0, 1, 2, 3]],
        ffd_experts_per_layer=[4, 2],
        ffd_expert_slots=[[0, 1, 2, 3], [1, 2]],
    ).train()
    x = tokens(2, 6, seed=11)
    out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.aux_metrics["aux/switch_pooled"])


def test_defaults_are_unchanged_moduleformer():
    config = ModuleFormerConfig.from_preset("tiny")
    assert (config.norm_type, config.expert_mlp, config.router_type, config.attention_type) == (
        "layer",
        "gelu",
        "mlp",
        "stick_breaking",
    )
    assert not config.moe_output_bias and config.final_norm_epsilon is None
    block = ModuleFormerForCausalLM(config).transformer.h[0]
    assert isinstance(block.ln_1, torch.nn.LayerNorm) and block.mlp.output_bias is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"norm_type": "batch"}, "norm_type"),
        ({"expert_mlp": "geglu"}, "expert_mlp"),
        ({"router_type": "gru"}, "router_type"),
        ({"attention_type": "alibi"}, "attention_type"),
        ({"final_norm_epsilon": 0.0}, "final_norm_epsilon"),
        ({"attention_type": "softmax_rope", "att_hidden": 6, "n_head": 2}, "even"),
        ({"attention_type": "softmax_rope", "rope_theta": -1.0}, "rope_theta"),
        ({"aux_loss_type": "switch_pooled"}, "one expert count"),
    ],
)
def test_bad_options_name_the_field(overrides, field):
    with pytest.raises((ValueError, StrictDataclassError), match=field):
        ModuleFormerConfig.from_preset("tiny", **overrides)

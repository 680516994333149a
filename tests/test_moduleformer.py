"""ModuleFormer: sparse experts against dense references, decoding, history, HF plumbing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM

from modformer.models.moduleformer import (
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerMemory,
)
from modformer.nn.moe import MixtureOfAttentionHeads, SparseMoE
from modformer.nn.moe_losses import mutual_information_loss, routing_regularization
from modformer.nn.stick_breaking import stick_breaking_attention_reference

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These matmuls are tiny: extra threads only add overhead, and on a shared 2-core
    machine they stall each other (a 2 s test took 50 s with the default thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> ModuleFormerConfig:
    settings = dict(vocab_size=VOCAB, n_layer=2, attention_block_size=8)
    return ModuleFormerConfig.from_preset("tiny", **{**settings, **overrides})


def tiny_model(seed: int = 0, **overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(seed)
    return ModuleFormerForCausalLM(tiny_config(**overrides)).eval()


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def routed_inputs(n_embd: int, seed: int = 0, B: int = 2, T: int = 9) -> torch.Tensor:
    return torch.randn(B, T, n_embd, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- SMoE / MoA building blocks


def test_smoe_with_one_expert_is_a_dense_mlp():
    torch.manual_seed(0)
    moe = SparseMoE(16, num_experts=1, top_k=1, hidden_size=32, router_hidden=8)
    x = routed_inputs(16)
    y, route = moe(x)
    assert torch.all(route.weights == 1.0)  # softmax over a single expert
    dense = F.gelu(x @ moe.w_in[0], approximate="tanh") @ moe.w_out[0]
    torch.testing.assert_close(y, dense, atol=1e-6, rtol=1e-5)


def test_router_computes_in_at_least_fp32():
    moe = SparseMoE(16, num_experts=4, top_k=2, hidden_size=8, router_hidden=8).double()
    route = moe.router(routed_inputs(16).double().reshape(-1, 16))
    assert route.logits.dtype == route.probs.dtype == route.weights.dtype == torch.float64
    # The fp64 gates are the fp64 softmax itself, not an fp32 rounding of it.
    x = routed_inputs(16).double().reshape(-1, 16)
    exact = torch.softmax(moe.router.expert_embedding(F.relu(moe.router.input_proj(x))), -1)
    torch.testing.assert_close(route.probs, exact, atol=1e-15, rtol=0)
    bf16 = moe.router.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert bf16.probs.dtype == torch.float32


def test_fp64_model_routes_in_fp64():
    model = tiny_model(seed=1).double()
    out = model.transformer(tokens(2, 6), use_cache=False)
    for att_route, ffd_route in out.router_outputs:
        for route in (att_route, ffd_route):
            assert route.probs.dtype == route.weights.dtype == torch.float64
    assert out.last_hidden_state.dtype == torch.float64


def _stick_breaking_mha(x, w_q, w_k, w_v, w_o, n_head, prefix_x=None):
    """Plain multi-head stick-breaking attention (the fp64 oracle), written out in full."""
    B, T, _ = x.shape
    keys_in = x if prefix_x is None else torch.cat([prefix_x, x], dim=1)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], n_head, -1).transpose(1, 2)

    out = stick_breaking_attention_reference(
        heads(x @ w_q), heads(keys_in @ w_k), heads(keys_in @ w_v)
    )
    return out.transpose(1, 2).reshape(B, T, -1) @ w_o


@pytest.mark.parametrize(("att_hidden", "n_head"), [(24, 3), (16, 1)])
def test_moa_with_one_expert_is_stick_breaking_multihead_attention(att_hidden, n_head):
    torch.manual_seed(0)
    n_embd = 16
    moa = MixtureOfAttentionHeads(n_embd, 1, 1, att_hidden, n_head, router_hidden=8, block_size=4)
    x = routed_inputs(n_embd)
    keys, values = moa.project_kv(x)
    y, route = moa(x, keys, values)
    assert torch.all(route.weights == 1.0)
    if moa.kv_proj is None:  # D_att == D_emb and one head: W_k = W_v = identity
        w_k = w_v = torch.eye(n_embd)
    else:
        w_k, w_v = moa.kv_proj.weight.t().chunk(2, dim=1)
    reference = _stick_breaking_mha(x, moa.w_q[0], w_k, w_v, moa.w_o[0], n_head)
    torch.testing.assert_close(y, reference.float(), atol=1e-5, rtol=1e-5)


def test_sparse_smoe_matches_dense_loop_over_experts():
    torch.manual_seed(1)
    N, k = 5, 2
    moe = SparseMoE(16, N, k, hidden_size=24, router_hidden=8)
    x = routed_inputs(16, seed=1).requires_grad_(True)
    token_mask = torch.ones(2 * 9, dtype=torch.bool)
    token_mask[[0, 1, 10]] = False  # padding tokens select no expert
    y, route = moe(x, token_mask)
    # Gates are the top-k softmax probabilities themselves, not renormalised.
    assert route.probs.dtype == torch.float32
    torch.testing.assert_close(route.weights, route.probs.gather(1, route.indices))
    assert torch.all(route.weights.sum(-1) < 1.0)

    flat = x.reshape(-1, 16)
    every_expert = [F.gelu(flat @ moe.w_in[m], approximate="tanh") @ moe.w_out[m] for m in range(N)]
    reference = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        if not token_mask[t]:
            continue
        for s in range(k):
            m = int(route.indices[t, s])
            reference[t] = reference[t] + route.weights[t, s] * every_expert[m][t]
    torch.testing.assert_close(y.reshape(-1, 16), reference, atol=1e-6, rtol=1e-5)
    assert torch.all(y.reshape(-1, 16)[~token_mask] == 0)

    upstream = torch.randn_like(reference)
    params = (x, moe.w_in, moe.w_out, moe.router.expert_embedding.weight)
    ours = torch.autograd.grad((y.reshape(-1, 16) * upstream).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((reference * upstream).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sparse_moa_matches_dense_loop_over_experts():
    """Several experts, top-2, a 4-key prefix and padded keys/queries."""
    torch.manual_seed(2)
    n_embd, N, k, att_hidden, n_head = 16, 4, 2, 16, 2
    moa = MixtureOfAttentionHeads(n_embd, N, k, att_hidden, n_head, router_hidden=8, block_size=4)
    B, T, P = 2, 7, 4
    x = routed_inputs(n_embd, seed=3, B=B, T=T)
    prefix_x = routed_inputs(n_embd, seed=4, B=B, T=P)
    key_padding_mask = torch.ones(B, P + T, dtype=torch.bool)
    key_padding_mask[0, :6] = False  # row 0 left-padded into the current tokens
    token_mask = key_padding_mask[:, P:].reshape(-1)

    prefix_k, prefix_v = moa.project_kv(prefix_x)
    cur_k, cur_v = moa.project_kv(x)
    keys, values = torch.cat([prefix_k, cur_k], 2), torch.cat([prefix_v, cur_v], 2)
    y, route = moa(x, keys, values, token_mask, key_padding_mask)

    # Dense reference: every expert attends for every token; keep the top-k, weight by gates.
    w_k, w_v = moa.kv_proj.weight.t().chunk(2, dim=1)
    keys_in = torch.cat([prefix_x, x], dim=1)

    def heads(t):
        return t.view(B, t.shape[1], n_head, -1).transpose(1, 2)

    every_expert = []
    for m in range(N):
        att = stick_breaking_attention_reference(
            heads(x @ moa.w_q[m]), heads(keys_in @ w_k), heads(keys_in @ w_v), key_padding_mask
        )
        every_expert.append((att.transpose(1, 2).reshape(B, T, -1) @ moa.w_o[m]).reshape(B * T, -1))
    reference = torch.zeros(B * T, n_embd)
    for t in range(B * T):
        if not token_mask[t]:
            continue
        for s in range(k):
            m = int(route.indices[t, s])
            reference[t] += route.weights[t, s] * every_expert[m][t].float()
    torch.testing.assert_close(y.reshape(B * T, -1), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the causal LM


def test_cached_and_uncached_greedy_decoding_agree():
    model = tiny_model()
    prompt = tokens(2, 6)
    runs = [
        model.generate(
            prompt,
            max_new_tokens=8,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)


def test_left_padded_batch_generation_matches_single_prompts():
    model = tiny_model(seed=1)
    prompts = [tokens(1, 7, seed=2)[0], tokens(1, 3, seed=3)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p)), **kwargs)
        assert torch.equal(together[i, width:], alone[0, len(p) :])


def test_padded_forward_matches_unpadded_forward():
    model = tiny_model(seed=2)
    x = tokens(1, 6, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], dim=1).long()
    plain = model(x, use_cache=False).logits
    with_pad = model(padded, attention_mask=mask, use_cache=False).logits[:, 3:]
    torch.testing.assert_close(with_pad, plain, atol=1e-5, rtol=0)


def test_save_pretrained_round_trip_and_auto_model(tmp_path):
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
    AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)
    x = tokens(2, 5)
    expected = model(x).logits
    for loader in (ModuleFormerForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is ModuleFormerForCausalLM
        saved, original = loaded.config.to_dict(), model.config.to_dict()
        saved.pop("_name_or_path"), original.pop("_name_or_path")
        assert saved == original
        torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)
    # The LM head stays tied to the embedding after loading.
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_history_second_segment_equals_one_long_sequence():
    model = tiny_model(seed=4, use_history=True)
    T = 6
    x = tokens(2, 2 * T, seed=5)
    first = model(x[:, :T], use_cache=False)
    assert first.memory.length == T and first.memory.batch_size == 2
    second = model(x[:, T:], memory=first.memory)
    whole = model(x, use_cache=False)
    torch.testing.assert_close(second.logits, whole.logits[:, T:], atol=1e-5, rtol=0)
    # Without the memory, segment 2 sees less context and the logits differ.
    alone = model(x[:, T:], use_cache=False)
    assert (alone.logits - whole.logits[:, T:]).abs().max() > 1e-3


def test_history_with_padding_in_memory():
    model = tiny_model(seed=5, use_history=True)
    T = 5
    x = tokens(2, 2 * T, seed=6)
    mask = torch.ones(2, 2 * T, dtype=torch.long)
    mask[1, :2] = 0  # row 1 starts with two padding tokens
    first = model(x[:, :T], attention_mask=mask[:, :T], use_cache=False)
    assert torch.equal(first.memory.key_padding_mask, mask[:, :T].bool())
    second = model(x[:, T:], attention_mask=mask[:, T:], memory=first.memory)
    whole = model(x, attention_mask=mask, use_cache=False)
    torch.testing.assert_close(second.logits, whole.logits[:, T:], atol=1e-5, rtol=0)


def test_history_length_caps_the_memory():
    model = tiny_model(seed=6, use_history=True, history_length=8)
    memory = None
    for i, expected_length in enumerate((5, 8, 8)):
        memory = model(tokens(2, 5, seed=i), memory=memory, use_cache=False).memory
        assert memory.length == expected_length


def test_unbounded_history_keeps_everything_and_equals_one_long_forward():
    model = tiny_model(seed=6, use_history=True, history_length=-1)
    x = tokens(2, 15, seed=3)
    memory, logits = None, []
    for i, expected_length in enumerate((5, 10, 15)):
        out = model(x[:, 5 * i : 5 * (i + 1)], memory=memory, use_cache=False)
        memory = out.memory
        assert memory.length == expected_length
        logits.append(out.logits)
    whole = model(x, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), whole, atol=1e-5, rtol=0)


def test_ibm_options_add_router_and_kv_biases():
    plain, ibm = tiny_model(seed=2), tiny_model(seed=2, router_bias=True, kv_bias=True)
    keys = set(ibm.state_dict()) - set(plain.state_dict())
    assert keys == {
        f"transformer.h.{i}.{name}.bias"
        for i in range(2)
        for name in ("attn.router.input_proj", "mlp.router.input_proj", "attn.kv_proj")
    }
    assert all(torch.all(ibm.state_dict()[k] == 0) for k in keys)  # initialised to zero
    missing, _ = ibm.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == keys
    x = tokens(2, 6, seed=2)
    torch.testing.assert_close(ibm(x).logits, plain(x).logits, atol=0, rtol=0)
    with torch.no_grad():
        for k in keys:
            ibm.state_dict()[k].normal_()
    assert (ibm(x).logits - plain(x).logits).abs().max() > 1e-2  # the biases are used


def test_untied_head_saves_loads_and_counts_one_embedding_row(tmp_path):
    model = tiny_model(seed=4, tie_word_embeddings=False)
    tied = tiny_model(seed=4)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.total_parameters() == tied.total_parameters() + VOCAB * 128
    # A token reads one row of an untied embedding; the head's matrix in full.
    assert model.active_parameters() == tied.active_parameters() + 128
    model.save_pretrained(tmp_path)
    loaded = ModuleFormerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    x = tokens(2, 6, seed=4)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_gradients_do_not_flow_into_the_memory():
    model = tiny_model(seed=7, use_history=True).train()
    x = tokens(2, 8, seed=7)
    first = model(input_ids=x[:, :4], labels=x[:, :4])
    assert all(not t.requires_grad for t in first.memory.keys + first.memory.values)
    first.loss.backward()  # frees segment 1's graph
    model.zero_grad()
    second = model(input_ids=x[:, 4:], labels=x[:, 4:], memory=first.memory)
    second.loss.backward()  # would fail if the memory were still attached to segment 1
    # The same step with the memory as plain constants gives the same gradients.
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    constants = ModuleFormerMemory(
        tuple(k.clone() for k in first.memory.keys), tuple(v.clone() for v in first.memory.values)
    )
    model(input_ids=x[:, 4:], labels=x[:, 4:], memory=constants).loss.backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=0, rtol=0)


def test_a_few_training_steps_reduce_the_loss():
    model = tiny_model(seed=8).train()
    pattern = tokens(1, 8, seed=8)
    x = pattern.repeat(4, 4)  # (4, 32): the same 8 tokens over and over
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model(input_ids=x, labels=x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


PRUNED_LAYOUT = dict(  # a pruned model: routers compute at the unpruned layout
    att_experts_per_layer=[3, 2],
    att_expert_slots=[[0, 2, 3], [1, 3]],
    ffd_experts_per_layer=[5, 8],
    ffd_expert_slots=[[0, 1, 4, 6, 7], list(range(8))],
)


@pytest.mark.parametrize("layout", [{}, PRUNED_LAYOUT], ids=["plain", "pruned"])
def test_forward_and_backward_make_no_host_syncs(monkeypatch, layout):
    model = tiny_model(seed=9, use_history=True, **layout).train()
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
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------- losses, metrics, config


def test_aux_loss_and_metrics():
    model = tiny_model(seed=10, aux_loss_weight=0.5).train()
    x = tokens(3, 7, seed=10)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, :4] = 0
    out = model(input_ids=x, attention_mask=mask, labels=x)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    # Recompute the MI loss from the routers' own logits on the real tokens only.
    real = mask.bool().reshape(-1)
    hidden = model.transformer(input_ids=x, attention_mask=mask, use_cache=False)
    per_router = [
        mutual_information_loss(route.logits[real])
        for pair in hidden.router_outputs
        for route in pair
    ]
    torch.testing.assert_close(out.aux_loss, 0.5 * torch.stack(per_router).mean())
    assert out.aux_metrics["aux/mi"].requires_grad is False
    for layer in range(model.config.n_layer):
        for kind, k in (("attn", model.config.k_att), ("ffn", model.config.k_ffd)):
            load = out.aux_metrics[f"load/{kind}/{layer}"]
            assert load.dim() == 1 and not load.requires_grad
            torch.testing.assert_close(load.sum(), torch.tensor(float(k)))


def test_routing_regularization_covers_only_inserted_experts():
    model = tiny_model(
        seed=11, aux_loss_type="none", routing_reg_weight=2.0, n_inserted_ffd_experts=3
    ).train()
    x = tokens(2, 5, seed=11)
    out = model(input_ids=x, labels=x)
    expected = sum(
        routing_regularization(block.mlp.router.inserted_expert_embedding.weight)
        for block in model.transformer.h
    )
    assert all(block.attn.router.inserted_expert_embedding is None for block in model.transformer.h)
    torch.testing.assert_close(out.aux_loss, 2.0 * expected)
    torch.testing.assert_close(out.aux_metrics["aux/routing_reg"], expected.detach())


@pytest.mark.parametrize("aux_loss_type", ["switch", "none"])
def test_other_aux_settings(aux_loss_type):
    model = tiny_model(seed=12, aux_loss_type=aux_loss_type, load_concentration_weight=0.1)
    x = tokens(2, 5, seed=12)
    out = model(input_ids=x, labels=x)
    assert ("aux/switch" in out.aux_metrics) == (aux_loss_type == "switch")
    assert "aux/mi" not in out.aux_metrics and "aux/load_concentration" in out.aux_metrics
    if aux_loss_type == "switch":  # near-uniform routing at init: balance ~1, z = log(N)^2
        assert 0.9 < out.aux_metrics["aux/switch"] < 1.5 + 0.1 * math.log(8) ** 2
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_active_and_total_parameters():
    model = tiny_model(seed=13)
    c = model.config
    experts_att = c.n_layer * 2 * c.n_att_experts * c.n_embd * c.att_hidden
    experts_ffd = c.n_layer * 2 * c.n_ffd_experts * c.n_embd * c.ffd_hidden
    total = sum(p.numel() for p in model.parameters())
    assert model.total_parameters() == total
    inactive = experts_att * (1 - c.k_att / c.n_att_experts) + experts_ffd * (
        1 - c.k_ffd / c.n_ffd_experts
    )
    assert model.active_parameters() == round(total - inactive)


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [("MoLM-4B-K2", 4e9, 350e6), ("MoLM-4B-K4", 4e9, 700e6), ("MoLM-8B-K2", 8e9, 700e6)],
)
def test_molm_presets_match_table_1(preset, total, active):
    with torch.device("meta"):
        model = ModuleFormerForCausalLM(ModuleFormerConfig.from_preset(preset))
    assert abs(model.total_parameters() / total - 1) < 0.05
    assert abs(model.active_parameters() / active - 1) < 0.05
    assert model.transformer.h[0].attn.kv_proj is None  # D_att == D_emb, one head
    assert not model.config.tie_word_embeddings  # as the published MoLM configs
    assert model.lm_head.weight is not model.transformer.wte.weight


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(k_att=5), "k_att"),
        (dict(k_ffd=9), "k_ffd"),
        (dict(att_hidden=65), "att_hidden"),
        (dict(router_activation="tanh"), "router_activation"),
        (dict(aux_loss_type="entropy"), "aux_loss_type"),
        (dict(activation_function="swish9"), "activation_function"),
        (dict(history_length=0), "history_length"),
        (dict(history_length=-2), "history_length"),
        (dict(att_hidden=128, n_head=1, kv_bias=True), "kv_bias"),
        (dict(router_type="linear", router_bias=True), "router_bias"),
        (dict(n_inserted_ffd_experts=9), "n_inserted_ffd_experts"),
        (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
        (dict(n_head=0), "n_head"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    # @strict re-raises validate_architecture's ValueError wrapped, message kept.
    with pytest.raises((ValueError, StrictDataclassError), match=field):
        tiny_config(**overrides)


def test_unknown_preset_is_clear():
    with pytest.raises(ValueError, match="unknown preset"):
        ModuleFormerConfig.from_preset("huge")


def test_bad_memory_and_masks_are_clear():
    model = tiny_model(seed=14, use_history=True)
    memory = model(tokens(2, 4), use_cache=False).memory
    with pytest.raises(ValueError, match="batch size"):
        model(tokens(3, 4), memory=memory)
    with pytest.raises(ValueError, match="not both"):
        model(tokens(2, 4), memory=memory, use_cache=True)
    with pytest.raises(ValueError, match="current segment"):
        model(tokens(2, 4), memory=memory, attention_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens(2, 4), attention_mask=torch.ones(2, 5))
    without_history = tiny_model(seed=14)
    with pytest.raises(ValueError, match="use_history"):
        without_history(tokens(2, 4), memory=memory)

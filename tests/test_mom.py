"""Mixture-of-Modules: config, routers, assembly against explicit loops, policies, KV cache,
HF integration."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modformer.models.gpt import Block, GPTConfig, GPTForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM, MoMModel
from modformer.models.mom.policies import LearnedPolicy, MoEPolicy
from modformer.nn.routers import GRURouter, MLPRouter, top_k_routing

VOCAB = 61

# Same lines as in modformer/models/__init__.py (idempotent), so this file does not
# depend on the package registration being in place.
AutoConfig.register(MoMConfig.model_type, MoMConfig, exist_ok=True)
AutoModel.register(MoMConfig, MoMModel, exist_ok=True)
AutoModelForCausalLM.register(MoMConfig, MoMForCausalLM, exist_ok=True)


def small_config(**kw) -> MoMConfig:
    base = dict(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_head=4, router_dim=16, chunks="[1-2-1]"
    )
    return MoMConfig(**{**base, **kw})


@torch.no_grad()
def spread_out(model: MoMForCausalLM, skip_bias: float = 0.0) -> MoMForCausalLM:
    """Large embeddings, biases, LN affines and router weights, so that routers pick
    different modules for different tokens and a bug in any path shows in the logits."""
    for name, p in model.named_parameters():
        if "router" in name and "weight" in name:
            p.normal_(0.0, 1.0)
        elif "router" in name:
            p.normal_(0.0, 0.5)
        elif "wte" in name or "wpe" in name:
            p.normal_(0.0, 1.0)
        elif "ln" in name and "weight" in name:
            p.normal_(1.0, 0.3)
        elif "bias" in name:
            p.normal_(0.0, 0.3)
    for chunk in model.transformer.chunks:
        if isinstance(chunk.policy, LearnedPolicy) and chunk.policy.attn_router.out.bias.numel():
            for router in (chunk.policy.attn_router, chunk.policy.ffn_router):
                if model.config.skip:
                    router.out.bias[-1] += skip_bias
    return model


def make_model(seed: int = 0, skip_bias: float = 0.0, **kw) -> MoMForCausalLM:
    torch.manual_seed(seed)
    return spread_out(MoMForCausalLM(small_config(**kw)), skip_bias).eval()


# ---- explicit-loop reference ----------------------------------------------------------


def ln(pool, m, v):
    bias = None if pool.ln_bias is None else pool.ln_bias[m]
    return F.layer_norm(v, (v.shape[-1],), pool.ln_weight[m], bias, pool.eps)


def _b(bias, m):
    """Module m's bias, or 0 in a model without biases."""
    return 0.0 if bias is None else bias[m]


def reference_attention(pool, x, index, weight, num_modules, weighted_qkv, tied):
    """Eq. 5 token by token: q/k/v summed over picked modules, all-SKIP tokens are
    neither queries nor keys, output sum_k r_k a W^O_k."""
    B, T, d = x.shape
    Z, hd = pool.n_head, d // pool.n_head
    qkv = torch.zeros(B, T, 3 * d)
    is_key = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for slot in range(index.shape[-1]):
                m = int(index[b, t, slot])
                if m == num_modules:
                    continue
                is_key[b, t] = True
                m = 0 if tied else m
                row = ln(pool, m, x[b, t]) @ pool.qkv_weight[m] + _b(pool.qkv_bias, m)
                qkv[b, t] += row * weight[b, t, slot] if weighted_qkv else row
    q, k, v = qkv.split(d, dim=-1)
    out = torch.zeros(B, T, d)
    for b in range(B):
        for t in range(T):
            if not is_key[b, t]:
                continue
            keys = [s for s in range(t + 1) if is_key[b, s]]
            a = torch.zeros(d)
            for z in range(Z):
                hs = slice(z * hd, (z + 1) * hd)
                scores = torch.stack([q[b, t, hs] @ k[b, s, hs] for s in keys]) / math.sqrt(hd)
                p = torch.softmax(scores, 0)
                a[hs] = sum(p[i] * v[b, s, hs] for i, s in enumerate(keys))
            for slot in range(index.shape[-1]):
                m = int(index[b, t, slot])
                if m == num_modules:
                    continue
                m = 0 if tied else m
                out[b, t] += weight[b, t, slot] * (a @ pool.proj_weight[m] + _b(pool.proj_bias, m))
    return out


def reference_ffn(pool, u, index, weight, num_modules, tied):
    """Eq. 6 token by token: sum_k r_k m^F_k(u)."""
    out = torch.zeros_like(u)
    for b in range(u.shape[0]):
        for t in range(u.shape[1]):
            for slot in range(index.shape[-1]):
                m = int(index[b, t, slot])
                if m == num_modules:
                    continue
                m = 0 if tied else m
                hidden = pool.act(ln(pool, m, u[b, t]) @ pool.fc_weight[m] + _b(pool.fc_bias, m))
                out[b, t] += weight[b, t, slot] * (
                    hidden @ pool.proj_weight[m] + _b(pool.proj_bias, m)
                )
    return out


def moe_reference_selection(policy, step, u):
    """Mixtral routing written out: softmax(u W^T) per token, top-K, renormalised."""
    probs = torch.softmax(u @ policy.routers[step].out.weight.T, dim=-1)
    weight, expert = probs.topk(policy.k, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    offset = 0 if policy.shared else step * policy.num_experts
    return expert + offset, weight


@torch.no_grad()
def reference_logits(model: MoMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The whole model with explicit loops in every chunk step. Learned and fixed
    policies decide through their own (separately tested) code, MoE routing is redone."""
    cfg, tr = model.config, model.transformer
    B, T = ids.shape
    x = tr.wte(ids) + tr.wpe(torch.arange(T))[None]
    carry = {}
    for entry in tr.h:
        if isinstance(entry, Block):
            x = entry(x)
            continue
        policy, state = entry.policy, entry.policy.begin(carry)
        for h in range(cfg.H):
            sel = policy.attention(h, x.reshape(B * T, -1), state)
            x = x + reference_attention(
                entry.attn,
                x,
                sel.indices.view(B, T, -1),
                sel.weights.view(B, T, -1),
                policy.num_attn_modules,
                cfg.weighted_qkv,
                cfg.mom_same,
            )
            u = x.reshape(B * T, -1)
            if isinstance(policy, MoEPolicy):
                index, weight = moe_reference_selection(policy, h, u)
            else:
                sel = policy.ffn(h, u, state)
                index, weight = sel.indices, sel.weights
            x = x + reference_ffn(
                entry.ffn,
                x,
                index.view(B, T, -1),
                weight.view(B, T, -1),
                policy.num_ffn_modules,
                cfg.mom_same,
            )
    return model.lm_head(tr.ln_f(x))


# ---- config ---------------------------------------------------------------------------


def test_presets_and_mom_names():
    small = MoMConfig.from_preset("small", mom="K2H6S")
    assert (small.K, small.H, small.skip, small.mom_name) == (2, 6, True, "K2H6S")
    assert small.chunk_sizes == [1, 1, 4, 1, 4, 1] and small.num_vanilla_layers == 12
    assert small.num_attention_layers == 4 + 2 * 6
    assert MoMConfig.from_preset("medium").num_vanilla_layers == 24
    assert MoMConfig.from_preset("large", mom="K3H1S").num_vanilla_layers == 36
    tiny = MoMConfig.from_preset("tiny", mom="K3H2S")
    gpt_tiny = GPTConfig.from_preset("tiny")
    assert tiny.num_vanilla_layers == gpt_tiny.n_layer and tiny.n_embd == gpt_tiny.n_embd
    # The shorthand is consumed: a reloaded config keeps later edits of K/H/skip.
    assert tiny.mom is None and MoMConfig.from_dict(tiny.to_dict()).mom_name == "K3H2S"
    # Cache layers: attention layers, plus key-flag layers only when a token may skip all.
    assert small_config(K=2, H=3).num_hidden_layers == 2 + 3
    assert small_config(K=1, H=3).num_hidden_layers == 2 + 3 + 3
    # Separate router K: the attention routers' K decides whether key flags are needed.
    split = small_config(K=2, K_attn=1, H=3)
    assert (split.attn_k, split.ffn_k, split.mom_name) == (1, 2, "K(A1,F2)H3S")
    assert split.num_hidden_layers == 2 + 3 + 3
    assert small_config(K=1, K_attn=2, H=3).num_hidden_layers == 2 + 3
    assert MoMConfig.from_dict(split.to_dict()).attn_k == 1  # saved and reloaded


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunks="1-4-1"), "chunks='1-4-1' is not a chunk string"),
        (dict(chunks="[1-0-1]"), "is not a chunk string"),
        (dict(mom="K2X6"), "mom='K2X6' is not a MoM name"),
        (dict(K=4, H=2), r"K=4 exceeds the 3 choices \(2 modules \+ SKIP\)"),
        (dict(K=3, H=2, skip=False), r"K=3 exceeds the 2 choices \(2 modules\)"),
        (dict(n_embd=30), r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (dict(router="lstm"), "router 'lstm' is unknown"),
        (dict(policy="random"), "policy 'random' is unknown"),
        (dict(policy="vanilla", H=3), "H must equal every chunk's size"),
        (dict(policy="parameter_sharing", H=3, share_map=[0, 1]), "needs share_map"),
        (dict(policy="parameter_sharing", H=2, share_map=[0, 2]), r"outside \[0, 2\)"),
        (dict(policy="moe", H=2), "has no SKIP module"),
        (dict(policy="moe", H=2, skip=False, K=3), "K=3 exceeds num_experts=2"),
        (dict(policy="layer_skip", H=2, skip_layers=[0]), "layer 0, which is not a chunk step"),
        (dict(skip_layers=[1]), "skip_layers is a parameter of the layer_skip"),
        (dict(policy="vanilla", H=2, mom_same=True), "mom_same ties"),
        (dict(balance_loss_weight=-1.0), "balance_loss_weight must be >= 0"),
        (dict(K_attn=4, H=2), r"K_attn=4 exceeds the 3 choices \(2 modules \+ SKIP\) of attention"),
        (dict(K=1, K_ffn=3, H=2, skip=False), r"K_ffn=3 exceeds the 2 choices .* of FFN"),
        (dict(K_ffn=0, H=2), "K_ffn=0: a separate top-K must be positive"),
        (dict(policy="vanilla", H=2, K_attn=1), "parameter of the learned policy"),
    ],
)
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(Exception, match=message):
        small_config(**kwargs)


# ---- routers --------------------------------------------------------------------------


def test_gru_router_matches_torch_grucell():
    torch.manual_seed(0)
    router = GRURouter(n_embd=12, state_dim=8, num_choices=5)
    cell = torch.nn.GRUCell(12, 8)
    with torch.no_grad():
        cell.weight_ih.copy_(router.x2h.weight)
        cell.bias_ih.copy_(router.x2h.bias.normal_())
        cell.weight_hh.copy_(router.h2h.weight)
        cell.bias_hh.copy_(router.h2h.bias.normal_())
    xs = torch.randn(3, 6, 12)  # 3 assembly steps of 6 tokens
    state, ref_state = None, torch.zeros(6, 8)
    for x in xs:
        logits, state = router(x, state)
        ref_state = cell(x, ref_state)
        torch.testing.assert_close(state, ref_state)
        torch.testing.assert_close(logits, router.out(ref_state))


def test_mlp_router_is_stateless_and_top_k_renormalises():
    torch.manual_seed(0)
    router = MLPRouter(n_embd=12, hidden_dim=16, num_choices=5)
    x = torch.randn(7, 12)
    (a, sa), (b, _) = router(x, None), router(x, torch.ones(7, 16))
    assert sa is None and torch.equal(a, b)
    logits = torch.randn(7, 5, dtype=torch.bfloat16)
    weight, index, probs = top_k_routing(logits, 2, renormalize=True)
    assert weight.dtype == probs.dtype == torch.float32
    torch.testing.assert_close(weight.sum(-1), torch.ones(7))
    raw, raw_index, _ = top_k_routing(logits, 2, renormalize=False)
    assert torch.equal(index, raw_index)
    torch.testing.assert_close(raw, probs.gather(1, index))
    torch.testing.assert_close(weight, raw / raw.sum(-1, keepdim=True))  # = renormalised


# ---- assembly -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(K=2, H=3, skip=True),
        dict(K=1, H=3, skip=True, weighted_qkv=True),  # all-SKIP tokens leave the keys
        dict(K=3, H=2, skip=True, weighted_qkv=True, renormalize=False),
        dict(K=2, H=2, skip=False, router="mlp", bias=False),
        dict(K=2, H=3, skip=True, mom_same=True),
        dict(K=2, K_attn=1, K_ffn=3, H=3, skip=True),  # separate router K
    ],
)
def test_learned_assembly_matches_explicit_loops(kwargs):
    model = make_model(**kwargs)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        out = model(ids, return_routing=True)
    skip_picks = [(~r.attn.picks_module()) for r in out.routing]
    if model.config.skip:  # the routers do pick SKIP, and other modules
        assert any(s.any() for s in skip_picks) and not all(s.all() for s in skip_picks)
    if model.config.attn_k == 1:  # some tokens skip a whole attention step
        assert any(s.all(-1).any() for s in skip_picks)
    for r in out.routing:  # each router picks its own K
        assert r.attn.indices.shape[-1] == model.config.attn_k
        assert r.ffn.indices.shape[-1] == model.config.ffn_k
    torch.testing.assert_close(out.logits, reference_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["moe", "moe_share"])
def test_moe_policies_match_explicit_loops(policy):
    model = make_model(policy=policy, K=2, H=2, skip=False, num_experts=3, seed=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    assert model.transformer.chunks[0].ffn.num_modules == (6 if policy == "moe" else 3)
    with torch.no_grad():
        out = model(ids, return_routing=True)
    for r in out.routing:  # private experts of step h are h*E .. h*E + E-1
        lo = 0 if policy == "moe_share" else 3 * r.step
        assert r.ffn.indices.min() >= lo and r.ffn.indices.max() < lo + 3
        assert torch.all(r.attn.indices == r.step)
    torch.testing.assert_close(out.logits, reference_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_parameter_sharing_matches_gpt_with_shared_layers():
    share_map = [1, 0, 1, 1]
    model = make_model(policy="parameter_sharing", H=4, share_map=share_map)
    tr = model.transformer
    chunk = tr.chunks[0]
    # A 6-layer GPT whose layers 1..4 are the chunk's modules in share_map order, the same
    # Block object wherever a module repeats.
    gpt = GPTForCausalLM(GPTConfig(**{**_shape(model.config), "n_layer": 6})).eval()
    modules = [_block_from_pools(gpt.config, chunk, i) for i in range(2)]
    gpt.transformer.h = torch.nn.ModuleList([tr.h[0]] + [modules[i] for i in share_map] + [tr.h[2]])
    gpt.transformer.wte, gpt.transformer.wpe, gpt.transformer.ln_f = tr.wte, tr.wpe, tr.ln_f
    gpt.lm_head = model.lm_head
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ref = gpt(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)


def _shape(config):
    names = ("vocab_size", "n_positions", "n_embd", "n_head", "bias", "layer_norm_epsilon")
    return {n: getattr(config, n) for n in names}


@torch.no_grad()
def _block_from_pools(gpt_config, chunk, i):
    block = Block(gpt_config, 0)
    block.ln_1.weight.copy_(chunk.attn.ln_weight[i])
    block.ln_1.bias.copy_(chunk.attn.ln_bias[i])
    block.attn.c_attn.weight.copy_(chunk.attn.qkv_weight[i].T)
    block.attn.c_attn.bias.copy_(chunk.attn.qkv_bias[i])
    block.attn.c_proj.weight.copy_(chunk.attn.proj_weight[i].T)
    block.attn.c_proj.bias.copy_(chunk.attn.proj_bias[i])
    block.ln_2.weight.copy_(chunk.ffn.ln_weight[i])
    block.ln_2.bias.copy_(chunk.ffn.ln_bias[i])
    block.mlp.c_fc.weight.copy_(chunk.ffn.fc_weight[i].T)
    block.mlp.c_fc.bias.copy_(chunk.ffn.fc_bias[i])
    block.mlp.c_proj.weight.copy_(chunk.ffn.proj_weight[i].T)
    block.mlp.c_proj.bias.copy_(chunk.ffn.proj_bias[i])
    return block


def test_layer_skip_static_equals_dropping_the_layer():
    model = make_model(policy="layer_skip", H=2, skip_layers=[2])
    tr = model.transformer
    chunk = tr.chunks[0]
    gpt = GPTForCausalLM(GPTConfig(**{**_shape(model.config), "n_layer": 3})).eval()
    gpt.transformer.h = torch.nn.ModuleList(
        [tr.h[0], _block_from_pools(gpt.config, chunk, 0), tr.h[2]]
    )
    gpt.transformer.wte, gpt.transformer.wpe, gpt.transformer.ln_f = tr.wte, tr.wpe, tr.ln_f
    gpt.lm_head = model.lm_head
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, gpt(ids, use_cache=False).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("policy", ["layer_skip", "early_exit"])
def test_per_token_skip_criteria_match_explicit_loops(policy):
    model = make_model(policy=policy, chunks="[1-3]", H=3)
    model.set_skip_criterion(lambda layer, hidden: hidden[:, layer] > 0.3)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        out = model(ids, return_routing=True)
    skipped = torch.stack([r.attn.indices[..., 0] == r.attn.num_choices for r in out.routing])
    assert skipped.any() and not skipped.all()
    assert torch.equal(
        skipped, torch.stack([r.ffn.indices[..., 0] == r.ffn.num_choices for r in out.routing])
    )
    if policy == "early_exit":  # once skipped, skipped for the rest
        assert torch.equal(skipped, skipped.cummax(0).values)
    else:  # some token runs a layer after skipping one
        assert (skipped[:-1] & ~skipped[1:]).any()
    torch.testing.assert_close(out.logits, reference_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_skip_criterion_needs_a_skip_policy():
    with pytest.raises(ValueError, match="needs policy 'layer_skip' or 'early_exit'"):
        make_model().set_skip_criterion(lambda layer, hidden: hidden[:, 0] > 0)


# ---- routing trace, losses, metrics ---------------------------------------------------


def test_routing_trace_format():
    model = make_model(chunks="[1-2-1-2]", K=2, H=3)
    ids = torch.randint(0, VOCAB, (2, 5))
    out = model(ids, return_routing=True)
    assert model(ids).routing is None
    assert [(r.chunk, r.step, r.layer) for r in out.routing] == [
        (0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 5), (1, 1, 6), (1, 2, 7),
    ]  # fmt: skip
    for r in out.routing:
        assert r.attn.indices.shape == r.ffn.weights.shape == (2, 5, 2)
        assert r.attn.num_choices == r.ffn.num_choices == 2
        assert r.attn.indices.max() <= 2 and r.attn.skip_index == 2
        torch.testing.assert_close(r.attn.weights.sum(-1), torch.ones(2, 5))
        assert not r.attn.weights.requires_grad


def test_balance_loss_and_module_loads():
    model = make_model(K=2, H=3, balance_loss_weight=0.01).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    # Switch balance term: >= 1 per decision, 1 only when perfectly balanced.
    assert 0.01 <= out.aux_loss.item() < 0.01 * 3
    loads = out.aux_metrics
    assert set(loads) == {"mom/chunk0/attn_load", "mom/chunk0/ffn_load", "mom/balance_loss"}
    for name in ("mom/chunk0/attn_load", "mom/chunk0/ffn_load"):
        assert loads[name].shape == (3,) and not loads[name].requires_grad
        torch.testing.assert_close(loads[name].sum(), torch.tensor(1.0))
    router = model.transformer.chunks[0].policy.attn_router
    (grad,) = torch.autograd.grad(out.aux_loss, router.out.weight)
    assert grad.abs().sum() > 0
    assert make_model(K=2, H=3)(ids, labels=ids).aux_loss is None


def test_module_loads_exclude_padding():
    model = make_model(K=1, H=2)
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, return_routing=True)
    real = mask.bool()
    expected = torch.stack(
        [F.one_hot(r.attn.indices[real][:, 0], 3).float().mean(0) for r in out.routing]
    ).mean(0)
    torch.testing.assert_close(out.aux_metrics["mom/chunk0/attn_load"], expected)


# ---- padding and KV cache -------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2])
def test_left_padding_does_not_change_real_tokens(K):
    model = make_model(K=K, H=3, skip_bias=0.5)
    ids = torch.randint(0, VOCAB, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], 1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids).logits
        batched = model(padded, attention_mask=mask, position_ids=pos).logits[:, 4:]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(K=1, H=3, skip=True),  # all-SKIP tokens: key flags kept in the cache
        dict(K=2, H=3, skip=True),
        dict(K=2, K_attn=1, K_ffn=3, H=3, skip=True),  # separate router K, key flags
        dict(policy="early_exit", H=2),
    ],
)
def test_cached_and_uncached_greedy_decoding_agree(kwargs):
    model = make_model(seed=3, skip_bias=0.5, **kwargs)
    if model.config.policy == "early_exit":
        model.set_skip_criterion(lambda layer, hidden: hidden[:, layer] > 0.5)
    prompt = torch.randint(0, VOCAB, (2, 6))
    gen = dict(
        max_new_tokens=10,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    cached = model.generate(prompt, use_cache=True, **gen)
    uncached = model.generate(prompt, use_cache=False, **gen)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if model.config.attention_may_skip_all:  # the cache really held masked keys
        with torch.no_grad():
            trace = model(cached.sequences, return_routing=True).routing
        all_skip = torch.stack([(~r.attn.picks_module()).all(-1) for r in trace])
        assert all_skip[..., :6].any() and all_skip[..., 6:].any() and not all_skip.all()


def test_beam_search_reorders_the_key_flags_with_the_cache():
    model = make_model(seed=3, skip_bias=0.5, K=1, H=3)
    prompt = torch.randint(0, VOCAB, (2, 6))
    gen = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **gen)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **gen))


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds n_positions=32"):
        make_model()(torch.zeros(1, 33, dtype=torch.long))


# ---- HF integration -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(K=1, H=3), dict(K=2, H=2, mom_same=True)])
def test_save_load_and_auto_classes(tmp_path, kwargs):
    model = make_model(**kwargs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "modformer_mom" and config.mom_name == model.config.mom_name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoMForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert isinstance(AutoModel.from_pretrained(tmp_path), MoMModel)


def test_from_scratch_init_follows_gpt2():
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig.from_preset("tiny", vocab_size=VOCAB))
    chunk = model.transformer.chunks[0]
    resid_std = 0.02 / math.sqrt(2 * 4)
    assert abs(chunk.attn.qkv_weight.std().item() - 0.02) < 2e-3
    assert abs(chunk.ffn.proj_weight.std().item() - resid_std) < 1e-3
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - resid_std) < 1e-3
    assert torch.all(chunk.attn.ln_weight == 1) and torch.all(chunk.ffn.fc_bias == 0)


def test_top_k_routing_computes_in_at_least_fp32():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights, _, probs = top_k_routing(logits * 1e-9, 2)
    assert weights.dtype == probs.dtype == torch.float64
    # fp64 resolves logits 1e-9 apart; an fp32 softmax would flatten them to uniform.
    assert probs.std(dim=-1).min() > 1e-12
    weights, _, probs = top_k_routing(logits.to(torch.bfloat16), 2)
    assert weights.dtype == probs.dtype == torch.float32


def test_fp64_model_routes_in_fp64():
    model = make_model(seed=3).double()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, return_routing=True)
    assert out.logits.dtype == torch.float64
    for step in out.routing:
        assert step.attn.weights.dtype == step.ffn.weights.dtype == torch.float64

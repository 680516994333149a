"""The routing vocabulary: `RoutingDecision` (the SKIP rule against plain loops) and the
`RoutedModel` protocol of both families (pools, decisions, key maps, config changes)."""

from __future__ import annotations

import pytest
import torch

from modformer.analysis.usage import UsageStats
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.models.routed import RoutedModel, canonical_pool_key, choice_labels
from modformer.nn.moe_losses import switch_balance, switch_load_balancing_loss
from modformer.nn.routing import RoutingDecision
from modformer.surgery import extend_model, prune_model

VOCAB = 64


def random_decision(n: int, k: int, num_choices: int, has_skip: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    top = num_choices + 1 if has_skip else num_choices
    indices = torch.stack([torch.randperm(top, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g)
    return RoutingDecision(indices, weights, num_choices, has_skip)


# ---- RoutingDecision -----------------------------------------------------------------


@pytest.mark.parametrize("has_skip", [True, False])
def test_skip_helpers_agree_with_plain_loops(has_skip):
    n, k, num_choices = 40, 2, 3
    decision = random_decision(n, k, num_choices, has_skip)
    weight = torch.randint(0, 2, (n,))
    runs = [[int(i) != num_choices for i in row] for row in decision.indices.tolist()]
    assert decision.picks_module().tolist() == runs
    assert decision.modules_run_per_token().tolist() == [sum(r) for r in runs]
    assert decision.runs_any_module().tolist() == [any(r) for r in runs]
    expected = [0] * (num_choices + int(has_skip))
    for row, w in zip(decision.indices.tolist(), weight.tolist()):
        for i in row:
            expected[i] += w
    assert decision.counts(weight).tolist() == expected
    assert decision.counts().sum() == n * k
    assert decision.num_columns == len(expected)
    assert decision.skip_index == (num_choices if has_skip else None)
    if has_skip:  # the random picks include SKIP, so the test checks something
        assert not decision.picks_module().all() and decision.counts()[-1] > 0


def test_without_tokens_and_shapes():
    decision = random_decision(6, 2, 4, has_skip=False)
    keep = torch.tensor([True, False, True, True, False, True])
    masked = decision.without_tokens(keep)
    assert (masked[~keep] == 4).all() and torch.equal(masked[keep], decision.indices[keep])
    viewed = decision.view_tokens(2, 3)
    assert viewed.indices.shape == viewed.weights.shape == (2, 3, 2)
    assert torch.equal(viewed.flat().indices, decision.indices)
    assert viewed.modules_run_per_token().shape == (2, 3)
    with pytest.raises(ValueError, match="same shape"):
        RoutingDecision(decision.indices, decision.weights[:, :1], 4)
    with pytest.raises(ValueError, match="num_choices must be >= 1"):
        RoutingDecision(decision.indices, decision.weights, 0)


def test_switch_balance_from_probs_equals_the_logit_form():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 5, generator=g)
    picks = logits.topk(2, -1).indices
    mask = torch.tensor([True] * 7 + [False] * 3)
    for token_mask in (None, mask):
        torch.testing.assert_close(
            switch_balance(torch.softmax(logits, -1), picks, token_mask),
            switch_load_balancing_loss(logits, picks, token_mask),
        )
    # padding takes no part: the masked value is the value on the real tokens alone
    torch.testing.assert_close(
        switch_balance(torch.softmax(logits, -1), picks, mask),
        switch_balance(torch.softmax(logits[:7], -1), picks[:7]),
    )


def test_choice_labels_and_old_key_names():
    assert choice_labels("M", 3, skip=True) == ["M0", "M1", "SKIP"]
    assert choice_labels("E", 2, skip=False) == ["E0", "E1"]
    assert canonical_pool_key("layer3/att") == "layer3/attn"
    assert canonical_pool_key("layer3/ffd") == "layer3/ffn"
    assert canonical_pool_key("chunk0/step1/attn") == "chunk0/step1/attn"


# ---- the protocol ---------------------------------------------------------------------


def moduleformer(**overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    config = ModuleFormerConfig.from_preset(
        "tiny", vocab_size=VOCAB, n_layer=2, n_att_experts=3, n_ffd_experts=5, **overrides
    )
    return ModuleFormerForCausalLM(config).eval()


def mom(**overrides) -> MoMForCausalLM:
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, n_embd=32, n_head=2, router_dim=16, chunks="[1-3-1-2]")
    config = MoMConfig.from_preset("tiny", **{**settings, **overrides})
    return MoMForCausalLM(config).eval()


def check_key_maps(model: RoutedModel) -> None:
    """Every stacked entry exists and has one row per choice (plus its extra rows)."""
    state = model.state_dict()
    for pool in model.routed_pools():
        assert pool.stacked, pool.name
        for param in pool.stacked:
            assert state[param.key].shape[0] == pool.num_choices + param.extra_rows, param.key


def test_moduleformer_pools():
    model = moduleformer()
    pools = model.routed_pools()
    assert [p.name for p in pools] == ["layer0/attn", "layer0/ffn", "layer1/attn", "layer1/ffn"]
    assert [p.num_choices for p in pools] == [3, 5, 3, 5]
    assert all(not p.has_skip and not p.per_step and p.label_prefix == "E" for p in pools)
    assert [p.min_keep for p in pools] == [model.config.k_att, model.config.k_ffd] * 2
    check_key_maps(model)
    assert model.inserted_parameter_pairs() == []
    assert model.routing_family == "moduleformer"


def test_mom_pools_per_policy():
    model = mom(mom="K2H3S")
    pools = model.routed_pools()
    assert [p.name for p in pools] == ["chunk0/attn", "chunk0/ffn", "chunk1/attn", "chunk1/ffn"]
    assert [p.num_choices for p in pools] == [3, 3, 2, 2]
    assert all(p.has_skip and p.per_step and p.steps == 3 for p in pools)
    assert [p.min_keep for p in pools] == [1] * 4  # K=2 counting SKIP
    assert [p.decision_key(1) for p in pools[:2]] == ["chunk0/step1/attn", "chunk0/step1/ffn"]
    check_key_maps(model)
    router_rows = [s for s in pools[0].stacked if "router" in s.key]
    assert router_rows and all(s.extra_rows == 1 for s in router_rows)  # the SKIP row
    assert not model.supports_insertion

    moe = mom(mom="K2H2", policy="moe", num_experts=3, chunks="[1-2-1]")
    attn, ffn = moe.routed_pools()
    assert (attn.num_choices, ffn.num_choices) == (2, 6)  # FFN: H * E private experts
    assert not attn.has_skip and not ffn.has_skip
    layer_skip = mom(mom="K1H2", policy="layer_skip", chunks="[1-2-1]")
    assert all(p.has_skip for p in layer_skip.routed_pools())


def test_mom_pools_keep_their_own_routers_top_k():
    """With separate K per router, each pool keeps enough modules for its own top-K, so a
    pruned model still validates."""
    model = mom(mom="K2H3S", K_attn=1, K_ffn=3)
    assert [p.min_keep for p in model.routed_pools()] == [1, 2, 1, 2]  # K - SKIP, >= 1
    torch.manual_seed(0)
    frequencies = {}
    for pool in model.routed_pools():  # one module per pool is used: prune all others
        frequencies[pool.name] = torch.tensor([1.0] + [0.0] * (pool.num_choices - 1))
    pruned, report = prune_model(model, frequencies, threshold=0.5)
    kept = [p.num_choices for p in pruned.routed_pools()]
    assert kept == [1, 2, 1, 2]
    assert (pruned.config.attn_k, pruned.config.ffn_k) == (1, 3)


@pytest.mark.parametrize("family", ["moduleformer", "mom"])
def test_routing_decisions_cover_every_pool_and_step(family):
    model = moduleformer() if family == "moduleformer" else mom(mom="K1H2S")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        decisions = model.routing_decisions(ids)
    pools = model.routed_pools()
    expected = [p.decision_key(h) for p in pools for h in range(p.steps)]
    assert sorted(d.key for d in decisions) == sorted(expected)
    for d in decisions:
        assert d.decision.indices.shape[0] == ids.numel()
        assert d.decision.num_choices == d.pool.num_choices
    if family == "mom":  # SKIP counting agrees with the model's own trace
        trace = model(ids, return_routing=True).routing
        for step in trace:
            d = next(x for x in decisions if x.key == f"chunk{step.chunk}/step{step.step}/attn")
            skips = sum(int(i) == step.attn.num_choices for i in step.attn.indices.flatten())
            assert d.decision.counts()[-1] == skips
        assert any(d.decision.counts()[-1] > 0 for d in decisions)


def test_config_keeping_and_insertion_changes():
    model = moduleformer()
    kept = {"layer0/attn": [0, 2], "layer0/ffn": [1, 2, 4], "layer1/attn": [0, 1, 2]}
    kept["layer1/ffn"] = [0, 1]
    changes = model.config_keeping(kept)
    assert changes["att_experts_per_layer"] == [2, 3]
    assert changes["ffd_expert_slots"] == [[1, 2, 4], [0, 1]]
    new = model.config_with_new_choices({"attn": 0, "ffn": 2})
    assert new["n_ffd_experts"] == 7 and new["n_inserted_ffd_experts"] == 2
    assert new["n_inserted_att_experts"] == 0
    extended = extend_model(model, 2, attention=False)
    pairs = extended.inserted_parameter_pairs()
    assert len(pairs) == 2 * 3  # per layer: w_in, w_out and the router rows
    assert all(inserted.endswith("_inserted") or "inserted_" in inserted for _, inserted in pairs)
    with pytest.raises(ValueError, match="has inserted experts; merge them first"):
        extended.check_prunable()  # its stacked rows would not be choices 0..N-1

    chunked = mom(mom="K2H2S")
    changes = chunked.config_keeping(
        {"chunk0/attn": [0, 2], "chunk0/ffn": [1], "chunk1/attn": [1], "chunk1/ffn": [0, 1]}
    )
    assert changes["attn_modules_per_chunk"] == [2, 1]
    assert changes["ffn_module_slots"] == [[1], [0, 1]]


def test_old_usage_names_are_read_under_todays_names():
    model = moduleformer()
    old = {"layer0/att": [5, 1, 0], "layer0/ffd": [1, 1, 1, 1, 0]}
    old |= {"layer1/att": [1, 1, 1], "layer1/ffd": [1, 1, 1, 1, 1]}
    stats = UsageStats.from_json({"arch": "moduleformer", "tokens": 3, "counts": old})
    assert set(stats.counts) == {"layer0/attn", "layer0/ffn", "layer1/attn", "layer1/ffn"}
    assert stats.column_labels(3) == ["E0", "E1", "E2"]
    _, from_stats = prune_model(model, stats, threshold=0.5)
    _, from_dict = prune_model(model, old, threshold=0.5)
    assert from_stats["pools"] == from_dict["pools"]
    assert from_stats["pools"][0]["key"] == "layer0/attn"

"""Pruning experts (ModuleFormer) and modules (MoM) by activation frequency."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

from modformer.analysis.usage import collect_usage
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.nn.routers import RouterSlots
from modformer.surgery import SurgeryError, extend_model, prune_model

VOCAB = 64
# Router rows (ModuleFormer: rows of A; MoM: output biases) pushed so low that these
# modules are never picked.
NEVER_ATT, NEVER_FFD = [1, 3], [0, 5, 6]
NEVER_MOM_ATTN, NEVER_MOM_FFN = [1, 3], [0]


def moduleformer(seed: int = 0, vocab_size: int = VOCAB, **overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(seed)
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=vocab_size, n_layer=2, **overrides)
    return ModuleFormerForCausalLM(config).eval()


def mom(seed: int = 0) -> MoMForCausalLM:
    torch.manual_seed(seed)
    config = MoMConfig.from_preset("tiny", vocab_size=VOCAB, chunks="[1-4-1]", mom="K2H2S")
    return MoMForCausalLM(config).eval()


def with_unused_experts(model: ModuleFormerForCausalLM) -> ModuleFormerForCausalLM:
    with torch.no_grad():
        for block in model.transformer.h:
            # act(Bx) >= 0 (ReLU), so all-negative rows give logits far below the others.
            block.attn.router.expert_embedding.weight[NEVER_ATT] = -10.0
            block.mlp.router.expert_embedding.weight[NEVER_FFD] = -10.0
    return model


def with_unused_modules(model: MoMForCausalLM) -> MoMForCausalLM:
    with torch.no_grad():
        for chunk in model.transformer.chunks:
            chunk.policy.attn_router.out.bias[NEVER_MOM_ATTN] = -1e4
            chunk.policy.ffn_router.out.bias[NEVER_MOM_FFN] = -1e4
    return model


def token_batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(n)]


def kept_by_key(report: dict) -> dict[str, list[int]]:
    return {pool["key"]: pool["kept"] for pool in report["pools"]}


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(router_bias=True, kv_bias=True, tie_word_embeddings=False)],
    ids=["plain", "ibm-layout"],
)
def test_pruning_unused_moduleformer_experts_keeps_logits(overrides):
    model = with_unused_experts(moduleformer(**overrides))
    batches = token_batches()
    pruned, report = prune_model(model, collect_usage(model, batches), threshold=0.01)

    kept = kept_by_key(report)
    for layer in range(2):
        # Exactly the never-selected experts go (the others all get picked on 384 tokens).
        assert kept[f"layer{layer}/attn"] == [0, 2]
        assert kept[f"layer{layer}/ffn"] == [1, 2, 3, 4, 7]
        assert pruned.transformer.h[layer].attn.w_q.shape[0] == 2
        assert pruned.transformer.h[layer].mlp.router.expert_embedding.weight.shape[0] == 5
    assert pruned.config.att_experts_per_layer == [2, 2]
    assert pruned.config.ffd_experts_per_layer == [5, 5]
    c = model.config
    per_att = 2 * c.n_embd * c.att_hidden + c.router_hidden  # W_q, W_o and a row of A
    per_ffd = 2 * c.n_embd * c.ffd_hidden + c.router_hidden
    assert report["params_before"] - report["params_after"] == 2 * (2 * per_att + 3 * per_ffd)

    for x in batches:
        routes_before = model.transformer(input_ids=x).router_outputs
        routes_after = pruned.transformer(input_ids=x).router_outputs
        for layer, (old, new) in enumerate(zip(routes_before, routes_after)):
            for kind, old_route, new_route in (("attn", old[0], new[0]), ("ffn", old[1], new[1])):
                kept_ids = torch.tensor(kept[f"layer{layer}/{kind}"])
                assert torch.equal(kept_ids[new_route.indices], old_route.indices)
        # Exact: the pruned routers compute at the unpruned layout (RouterSlots).
        assert torch.equal(pruned(input_ids=x).logits, model(input_ids=x).logits)


def test_pruning_unused_mom_modules_keeps_logits():
    model = with_unused_modules(mom())
    batches = token_batches()
    pruned, report = prune_model(model, collect_usage(model, batches), threshold=0.01)

    assert kept_by_key(report) == {"chunk0/attn": [0, 2], "chunk0/ffn": [1, 2, 3]}
    assert pruned.config.attn_modules_per_chunk == [2]
    assert pruned.config.ffn_modules_per_chunk == [3]
    chunk_before, chunk_after = model.transformer.chunks[0], pruned.transformer.chunks[0]
    assert chunk_after.attn.qkv_weight.shape[0] == 2 and chunk_after.ffn.fc_weight.shape[0] == 3
    # Router rows: the kept modules, then SKIP.
    assert torch.equal(
        chunk_after.policy.attn_router.out.bias, chunk_before.policy.attn_router.out.bias[[0, 2, 4]]
    )
    assert torch.equal(chunk_after.ffn.proj_weight, chunk_before.ffn.proj_weight[[1, 2, 3]])

    for x in batches:
        steps_before = model(input_ids=x, return_routing=True).routing
        out_after = pruned(input_ids=x, return_routing=True)
        for old, new in zip(steps_before, out_after.routing):
            # Pool index -> original index; SKIP (the pool size) -> the original SKIP index.
            attn_map, ffn_map = torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3, 4])
            assert torch.equal(attn_map[new.attn.indices], old.attn.indices)
            assert torch.equal(ffn_map[new.ffn.indices], old.ffn.indices)
        assert torch.equal(out_after.logits, model(input_ids=x).logits)


def test_pruning_mom_modules_that_keep_probability_mass_is_still_exact():
    # Never in the top-2, yet ~5% of the softmax each: MoM renormalises over the kept
    # logits, so removing them cannot change the weights.
    model = mom()
    with torch.no_grad():
        for chunk in model.transformer.chunks:
            chunk.policy.ffn_router.out.bias[NEVER_MOM_FFN] = -3.0
    x = token_batches(1)[0]
    logits = []
    router = model.transformer.chunks[0].policy.ffn_router
    hook = router.register_forward_hook(lambda module, args, out: logits.append(out[0]))
    model(input_ids=x)
    hook.remove()
    probs = torch.softmax(torch.cat(logits), dim=-1)
    assert probs[:, NEVER_MOM_FFN].min() > 1e-3
    pruned, report = prune_model(model, collect_usage(model, [x]), threshold=0.01)
    assert kept_by_key(report)["chunk0/ffn"] == [1, 2, 3]
    assert torch.equal(pruned(input_ids=x).logits, model(input_ids=x).logits)


def test_pruned_models_save_and_load(tmp_path):
    x = token_batches(1)[0]
    for name, model in (
        ("moduleformer", with_unused_experts(moduleformer())),
        ("mom", with_unused_modules(mom())),
    ):
        pruned, _ = prune_model(model, collect_usage(model, [x]), threshold=0.01)
        pruned.save_pretrained(tmp_path / name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert type(loaded) is type(pruned)
        assert torch.equal(loaded(input_ids=x).logits, pruned(input_ids=x).logits)


def test_threshold_and_norm_semantics():
    model = moduleformer()
    counts = {"layer0/attn": [10, 5, 1, 0], "layer1/attn": [4, 4, 4, 4]}
    counts |= {"layer0/ffn": [8, 7, 6, 5, 4, 3, 2, 1], "layer1/ffn": [1, 0, 0, 0, 0, 0, 0, 9]}
    _, report = prune_model(model, counts, threshold=0.5)  # f / max >= 0.5 stays
    assert kept_by_key(report) == {
        "layer0/attn": [0, 1],
        "layer0/ffn": [0, 1, 2, 3, 4],  # 4/8 is not below 0.5
        "layer1/attn": [0, 1, 2, 3],
        "layer1/ffn": [0, 7],  # 1/9 < 0.5, but top-2 needs two experts: the next most used
    }
    assert [p["raised_to_top_k"] for p in report["pools"]] == [False, False, False, True]
    _, report = prune_model(model, counts, threshold=0.2, norm="sum")  # f / sum >= 0.2
    assert kept_by_key(report)["layer0/attn"] == [0, 1]  # 10/16, 5/16 stay; 1/16 goes
    assert kept_by_key(report)["layer0/ffn"] == [0, 1]  # only 8/36 >= 0.2; top-2 adds 7/36
    _, report = prune_model(model, counts, threshold=0.0)
    assert all(p["after"] == p["before"] for p in report["pools"])
    assert report["params_after"] == report["params_before"]


def test_bad_input_errors():
    model = moduleformer()
    counts = {f"layer{i}/{k}": [1.0] * n for i in range(2) for k, n in (("attn", 4), ("ffn", 8))}
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(SurgeryError, match="threshold must be in \\[0, 1\\]"):
            prune_model(model, counts, threshold)
    with pytest.raises(SurgeryError, match="would remove every module of layer0/attn"):
        prune_model(model, counts, threshold=0.3, norm="sum")  # 1/4 < 0.3 everywhere
    with pytest.raises(SurgeryError, match="norm must be one of"):
        prune_model(model, counts, 0.5, norm="mean")
    with pytest.raises(SurgeryError, match="counts 3 modules but the model has 4"):
        prune_model(model, {**counts, "layer1/attn": [1, 1, 1]}, 0.5)
    with pytest.raises(SurgeryError, match="no entry 'layer1/ffn'"):
        prune_model(model, {k: v for k, v in counts.items() if k != "layer1/ffn"}, 0.5)
    with pytest.raises(SurgeryError, match="all counts are 0"):
        prune_model(model, {**counts, "layer0/ffn": [0] * 8}, 0.5)
    with pytest.raises(SurgeryError, match="non-negative"):
        prune_model(model, {**counts, "layer0/ffn": [-1.0] * 8}, 0.5)
    mom_usage = collect_usage(mom(), token_batches(1))
    with pytest.raises(SurgeryError, match="collected on a mom model"):
        prune_model(model, mom_usage, 0.5)
    gpt = GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=VOCAB))
    with pytest.raises(SurgeryError, match="GPTForCausalLM has no modules to prune"):
        prune_model(gpt, counts, 0.5)


def test_mom_keeps_k_choices_counting_skip():
    model = mom()  # K=2 with SKIP: one module plus SKIP still gives K choices
    freqs = {"chunk0/attn": [1.0, 0.0, 0.0, 0.0], "chunk0/ffn": [0.1, 1.0, 0.2, 0.0]}
    pruned, report = prune_model(model, freqs, threshold=0.5)
    assert kept_by_key(report) == {"chunk0/attn": [0], "chunk0/ffn": [1]}
    assert pruned.transformer.chunks[0].policy.attn_router.out.weight.shape[0] == 2
    no_skip = MoMForCausalLM(MoMConfig.from_preset("tiny", vocab_size=VOCAB, mom="K2H2"))
    _, report = prune_model(no_skip, {"chunk0/attn": [1, 0], "chunk0/ffn": [1, 1]}, 0.5)
    assert kept_by_key(report)["chunk0/attn"] == [0, 1]  # K=2 without SKIP: both stay
    assert report["pools"][0]["raised_to_top_k"]


def test_pruning_an_extended_model_merges_its_inserted_experts():
    model = extend_model(moduleformer(), 2)
    usage = collect_usage(model, token_batches(2))
    pruned, report = prune_model(model, usage, threshold=0.0)
    assert report["merged_inserted_experts"]
    config = pruned.config
    assert config.n_inserted_att_experts == 0 and config.trainable_scope is None
    assert config.att_experts_per_layer == [6, 6] and config.ffd_experts_per_layer == [10, 10]
    assert all(p.requires_grad for p in pruned.parameters())
    x = token_batches(1)[0]
    assert torch.equal(pruned(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_config_validation_of_router_slots():
    tiny = dict(n_layer=2, n_att_experts=4, att_experts_per_layer=[2, 3])
    with pytest.raises(StrictDataclassError, match="att_expert_slots needs att_experts_per_layer"):
        ModuleFormerConfig.from_preset("tiny", n_layer=2, att_expert_slots=[[0, 1], [0, 1]])
    with pytest.raises(StrictDataclassError, match="has 1 entries but there are 2 pools"):
        ModuleFormerConfig.from_preset("tiny", **tiny, att_expert_slots=[[0, 1]])
    with pytest.raises(StrictDataclassError, match=r"att_expert_slots\[1\] lists 2 slots"):
        ModuleFormerConfig.from_preset("tiny", **tiny, att_expert_slots=[[0, 1], [0, 1]])
    with pytest.raises(StrictDataclassError, match=r"must be increasing slots in \[0, 4\)"):
        ModuleFormerConfig.from_preset("tiny", **tiny, att_expert_slots=[[0, 1], [1, 2, 4]])
    with pytest.raises(StrictDataclassError, match=r"ffn_module_slots\[0\]=\[3, 1\]"):
        MoMConfig.from_preset("tiny", ffn_modules_per_chunk=[2], ffn_module_slots=[[3, 1]])
    with pytest.raises(StrictDataclassError, match="attn_module_slots needs attn_modules_per"):
        MoMConfig.from_preset("tiny", attn_module_slots=[[0, 1]])
    config = ModuleFormerConfig.from_preset("tiny", **tiny, att_expert_slots=[[1, 3], [0, 2, 3]])
    assert config.att_expert_slots_in_layer(1) == [0, 2, 3]


def test_config_validation_of_pruned_shapes():
    with pytest.raises(
        StrictDataclassError, match=r"k_att \(2\) must be <= att_experts_per_layer\[1\] \(1\)"
    ):
        ModuleFormerConfig.from_preset("tiny", n_layer=2, att_experts_per_layer=[4, 1])
    with pytest.raises(StrictDataclassError, match="has 3 entries but the model has n_layer=2"):
        ModuleFormerConfig.from_preset("tiny", n_layer=2, ffd_experts_per_layer=[8, 8, 8])
    with pytest.raises(StrictDataclassError, match="one positive module count per chunk"):
        MoMConfig.from_preset("tiny", attn_modules_per_chunk=[2, 2])
    with pytest.raises(StrictDataclassError, match="needs the learned policy"):
        MoMConfig.from_preset("tiny", mom="K1H2", policy="vanilla", ffn_modules_per_chunk=[1])
    with pytest.raises(
        StrictDataclassError, match="exceeds the 1 choices .* chunk 0's pruned FFN pool"
    ):
        MoMConfig.from_preset("tiny", mom="K2H2", ffn_modules_per_chunk=[1])


def test_pruning_a_pruned_model_with_uneven_layers():
    model = with_unused_experts(moduleformer())
    with torch.no_grad():  # layer 1 also never uses FFN expert 7: 5 and 4 experts remain
        model.transformer.h[1].mlp.router.expert_embedding.weight[7] = -10.0
    batches = token_batches()
    pruned, _ = prune_model(model, collect_usage(model, batches), threshold=0.01)
    assert pruned.config.ffd_experts_per_layer == [5, 4]
    usage = collect_usage(pruned, batches)
    assert usage.counts["layer1/ffn"].numel() == 4  # each layer counts its own experts
    again, report = prune_model(pruned, usage, threshold=0.01)
    assert report["params_after"] == report["params_before"]
    assert again.config.ffd_experts_per_layer == [5, 4]
    # Slots compose: each kept expert keeps its place in the original 8-wide router.
    assert pruned.config.ffd_expert_slots == [[1, 2, 3, 4, 7], [1, 2, 3, 4]]
    assert again.config.ffd_expert_slots == pruned.config.ffd_expert_slots
    assert pruned.config.n_ffd_experts == 8
    for x in batches:
        assert torch.equal(again(input_ids=x).logits, model(input_ids=x).logits)


def test_pruning_in_two_rounds_equals_pruning_once():
    model = with_unused_experts(moduleformer())
    batches = token_batches()
    once, _ = prune_model(model, collect_usage(model, batches), threshold=0.01)
    # First round: only layer 0's never-used FFN experts; second round: the rest.
    first = {"layer0/attn": [1, 1, 1, 1], "layer1/attn": [1, 1, 1, 1], "layer1/ffn": [1] * 8}
    first["layer0/ffn"] = [0, 1, 1, 1, 1, 0, 0, 1]
    half, _ = prune_model(model, first, threshold=0.5)
    twice, _ = prune_model(half, collect_usage(half, batches), threshold=0.01)
    assert twice.config.to_dict()["ffd_expert_slots"] == once.config.to_dict()["ffd_expert_slots"]
    for x in batches:
        assert torch.equal(twice(input_ids=x).logits, once(input_ids=x).logits)


def test_router_slots_give_the_unpruned_logits_bit_for_bit():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(257, 64), torch.randn(16, 64), torch.randn(16)
    full = torch.nn.functional.linear(x, weight, bias)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 16, (1,), generator=g))
        keep = torch.randperm(16, generator=g)[:n].sort().values
        slots = RouterSlots(keep.tolist(), 16)
        logits = slots.linear(x, weight[keep], bias[keep])
        assert logits.shape == (257, 16)
        assert torch.equal(slots.choices(logits), full[:, keep])
        assert torch.isneginf(logits[:, slots.empty]).all()
        # Top-k in slot space, mapped to choices: the kept columns' own top-k.
        k = min(n, 3)
        picks = slots.choice_index(logits.topk(k, dim=-1).indices)
        assert torch.equal(picks, full[:, keep].topk(k, dim=-1).indices)
    for bad, match in (
        ([], "non-empty increasing"),
        ([2, 1], "increasing"),
        ([0, 16], r"\[0, num_slots=16\)"),
    ):
        with pytest.raises(ValueError, match=match):
            RouterSlots(bad, 16)


def test_extending_a_pruned_model_appends_slots():
    model = with_unused_experts(moduleformer())
    batches = token_batches()
    pruned, _ = prune_model(model, collect_usage(model, batches), threshold=0.01)
    extended = extend_model(pruned, 2, ffn=False)
    c = extended.config
    assert c.n_att_experts == 6 and c.att_experts_per_layer == [4, 4]
    assert c.att_expert_slots == [[0, 2, 4, 5], [0, 2, 4, 5]]
    assert c.ffd_expert_slots == pruned.config.ffd_expert_slots and c.n_ffd_experts == 8
    # Pruning the extension's (never-used) new experts gives the pruned model back.
    with torch.no_grad():
        for block in extended.transformer.h:
            block.attn.router.inserted_expert_embedding.weight.fill_(-10.0)
    back, _ = prune_model(extended, collect_usage(extended, batches), threshold=0.01)
    assert back.config.att_expert_slots == pruned.config.att_expert_slots
    for x in batches:
        assert torch.equal(back(input_ids=x).logits, pruned(input_ids=x).logits)

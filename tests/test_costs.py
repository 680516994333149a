"""Cost accounting: analytic FLOPs against torch's FLOP counter and hand counts, measured
memory, the cost table and its CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modformer.cli_args import add_cost_arguments
from modformer.commands.cost import run_cost
from modformer.data.dataset import TokenDataset
from modformer.eval.costs import (
    CostRow,
    cost_table,
    count_flops_with_torch,
    flops_per_token,
    format_cost_table,
    inference_flops,
    parse_config_spec,
    peak_memory,
    peak_tensor_bytes,
)
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.models.mom.modeling_mom import MoMChunk

VOCAB = 384  # > the byte tokenizer's ids, small enough that the LM head does not dominate
B, T = 2, 16


def tokens(batch: int = B, seq: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gpt(**overrides) -> GPTForCausalLM:
    torch.manual_seed(0)
    return GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)).eval()


def mom(**overrides) -> MoMForCausalLM:
    torch.manual_seed(0)
    return MoMForCausalLM(MoMConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)).eval()


def moduleformer(**overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)
    return ModuleFormerForCausalLM(config).eval()


def bias_attention_router_to_skip(model: MoMForCausalLM, shift: float) -> None:
    """Add `shift` to the SKIP logit of every chunk's attention router."""
    with torch.no_grad():
        for chunk in model.transformer.chunks:
            chunk.policy.attn_router.out.bias[-1] += shift


def routing(model: MoMForCausalLM, input_ids: torch.Tensor):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False, return_routing=True).routing


class _WeightedRowSums(TorchDispatchMode):
    """Sums the FLOPs of batched (n_tokens, 1, k) @ (n_tokens, k, f) products."""

    def __init__(self, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            a, b = args[0], args[1]
            if a.shape[0] == self.n_tokens and a.shape[1] == 1:
                self.flops += 2 * a.shape[0] * a.shape[2] * b.shape[2]
        return func(*args, **(kwargs or {}))


def weighted_row_sum_flops(model, x: torch.Tensor) -> int:
    """FLOPs the counter sees for summing each token's k weighted pair rows when that sum
    is done as a batched (1 x k) @ (k x f) product: k multiply-adds per output element,
    elementwise work by our convention (like the index_add it may replace), so not in
    the analytic count. 0 when the implementation sums rows another way."""
    mode = _WeightedRowSums(x.numel())
    with torch.no_grad(), mode:
        model(input_ids=x, use_cache=False)
    return mode.flops


# ---- GPT -------------------------------------------------------------------------------


def test_gpt_dense_count_equals_flop_counter_exactly():
    model, x = gpt(), tokens()
    report = inference_flops(model, x, attention="dense")
    counted = count_flops_with_torch(model, x)
    assert report.total == sum(counted.values())
    c = report.components
    assert counted["aten.addmm"] == c["attention_projections"] + c["ffn"]
    assert counted["aten._scaled_dot_product_flash_attention_for_cpu"] == c["attention_scores"]
    assert counted["aten.mm"] == c["lm_head"]
    assert c["router"] == 0
    assert report.tokens == B * T
    assert report.active_parameters == sum(p.numel() for p in model.parameters())


def test_gpt_causal_attention_counts_only_visible_keys():
    model, x = gpt(), tokens()
    d, layers = model.config.n_embd, model.config.n_layer
    causal = inference_flops(model, x)
    dense = inference_flops(model, x, attention="dense")
    # Query t sees t + 1 keys: T (T + 1) / 2 pairs per row; 2 matmuls x 2 FLOPs x d each.
    assert causal.components["attention_scores"] == layers * B * T * (T + 1) // 2 * 4 * d
    assert dense.components["attention_scores"] == layers * B * T * T * 4 * d
    for name in ("attention_projections", "ffn", "lm_head"):
        assert causal.components[name] == dense.components[name]
    # Per token and layer 24 d^2 (c_attn 6, c_proj 2, c_fc 8, mlp c_proj 8); 2 d V for the head.
    per_token_linear = layers * 24 * d * d + 2 * d * VOCAB
    assert causal.per_token == pytest.approx(
        per_token_linear + causal.components["attention_scores"] / (B * T)
    )


def test_padding_costs_nothing():
    model = gpt()
    long_row, short_row = tokens(1, T, seed=1), tokens(1, 10, seed=2)
    padded = torch.cat(
        [torch.cat([torch.zeros(1, T - 10, dtype=torch.long), short_row], 1), long_row]
    )
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, : T - 10] = 0
    together = inference_flops(model, padded, mask)
    apart = [inference_flops(model, row) for row in (short_row, long_row)]
    assert together.tokens == 10 + T
    assert together.total == sum(r.total for r in apart)
    assert flops_per_token(model, {"input_ids": padded, "attention_mask": mask}) == pytest.approx(
        together.total / (10 + T)
    )


# ---- MoM -------------------------------------------------------------------------------


def brute_force_causal_pairs(steps) -> int:
    """Per step: every query that runs an attention module, times the keys at or before
    it that run one too (loops, as an independent check of the vectorised count)."""
    pairs = 0
    for step in steps:
        runs = step.attn.picks_module().any(-1).tolist()
        for row in runs:
            for t in range(len(row)):
                if row[t]:
                    pairs += sum(row[: t + 1])
    return pairs


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mom="K1H2S"),  # a token may skip a whole attention step
        dict(mom="K2H2S", router="mlp"),
        dict(mom="K2H2", policy="moe"),
        dict(mom="K1H2S", mom_same=True),
        # pruned pools: the routers compute at the unpruned width
        dict(mom="K1H2S", ffn_modules_per_chunk=[1], ffn_module_slots=[[1]]),
        # separate router K: one attention pick (some tokens skip it all), three FFN picks
        dict(mom="K2H2S", K_attn=1, K_ffn=3),
    ],
    ids=["K1H2S", "K2H2S-mlp", "moe", "mom-same", "pruned", "K_attn1-K_ffn3"],
)
def test_mom_count_matches_flop_counter_with_skip(overrides):
    # Fresh GRU routers send about 40% of the K1H2S picks to SKIP (asserted below).
    # Without biases the grouped backend's GEMMs are exactly the modules' matmuls (with
    # them it also folds LN biases and module biases into extra GEMM columns, work that
    # the analytic count, matmuls only, leaves out by convention).
    model, x = mom(bias=False, **overrides), tokens()
    steps = routing(model, x)
    report = inference_flops(model, x, attention="dense")
    counted = count_flops_with_torch(model, x)
    # Every computed matmul is accounted for: the modules the tokens picked, routers,
    # fixed blocks and the head.
    assert sum(counted.values()) - weighted_row_sum_flops(model, x) == report.total
    # The picked modules' matmuls are the grouped GEMMs, at the analytic count.
    modules = report.components["attention_projections"] + report.components["ffn"]
    fixed_blocks = 2 * B * T * 24 * model.config.n_embd**2  # the two blocks of [1-2-1]
    assert counted["modformer.grouped_mm"] == modules - fixed_blocks
    # The dense SDPA kernel sees every position; the analytic dense count agrees.
    sdpa = counted["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert sdpa == report.components["attention_scores"]

    if model.config.skip and model.config.attn_k == 1:
        skipped = torch.stack([(~s.attn.picks_module()) for s in steps]).float()
        assert 0.0 < skipped.mean() < 1.0, "the test needs some all-SKIP tokens"
        d = model.config.n_embd
        causal = inference_flops(model, x)
        fixed_blocks = 2 * B * T * (T + 1) // 2 * 4 * d
        assert causal.components["attention_scores"] == (
            fixed_blocks + brute_force_causal_pairs(steps) * 4 * d
        )


def test_skip_reduces_attention_cost():
    x = tokens()
    never, often = mom(mom="K1H2S"), mom(mom="K1H2S")  # the fresh router skips ~40%
    bias_attention_router_to_skip(never, -1e4)
    no_skip, with_skip = inference_flops(never, x), inference_flops(often, x)
    assert all(s.attn.picks_module().all() for s in routing(never, x))
    runs = sum(int(s.attn.picks_module().sum()) for s in routing(often, x))
    pair_flops = 2 * 128 * 3 * 128 + 2 * 128 * 128  # W_QKV and W_O of one module
    fixed = 2 * B * T * pair_flops  # the two fixed blocks of [1-2-1]
    assert with_skip.components["attention_projections"] == fixed + runs * pair_flops
    for name in ("attention_projections", "attention_scores"):
        assert with_skip.components[name] < no_skip.components[name]


def test_all_skip_chunk_costs_only_its_routers():
    model, x = mom(mom="K1H2S"), tokens()
    with torch.no_grad():
        for chunk in model.transformer.chunks:
            chunk.policy.attn_router.out.bias[-1] += 1e4
            chunk.policy.ffn_router.out.bias[-1] += 1e4
    report = inference_flops(model, x)
    fixed_only = inference_flops(gpt(n_layer=2), x)  # the two fixed blocks and the head
    for name in ("attention_projections", "attention_scores", "ffn", "lm_head"):
        assert report.components[name] == fixed_only.components[name]
    router = model.transformer.chunks[0].policy.attn_router
    per_step = [  # two GRU routers per step; no state matmul at the chunk's first step
        2 * (2 * 128 * 3 * router.state_dim + 2 * router.state_dim * 3),
        2 * (2 * 128 * 3 * router.state_dim + 2 * router.state_dim * 3)
        + 2 * 2 * router.state_dim * 3 * router.state_dim,
    ]
    assert report.components["router"] == B * T * sum(per_step)
    assert report.active_parameters < sum(p.numel() for p in model.parameters())


def test_mom_vanilla_policy_costs_what_gpt_costs():
    x = tokens()
    vanilla, dense = inference_flops(mom(policy="vanilla"), x), inference_flops(gpt(), x)
    assert vanilla.components == dense.components
    assert vanilla.total == dense.total


def test_mom_active_parameters_count_distinct_modules():
    model, x = mom(mom="K1H2"), tokens()  # one module per step, no SKIP
    steps = routing(model, x)
    report = inference_flops(model, x)
    total = sum(p.numel() for p in model.parameters())
    chunk = next(m for m in model.transformer.h if isinstance(m, MoMChunk))
    per_attn = sum(p.numel() for p in chunk.attn.parameters()) // 2
    per_ffn = sum(p.numel() for p in chunk.ffn.parameters()) // 2
    attn_distinct = (steps[0].attn.indices != steps[1].attn.indices).float() + 1
    ffn_distinct = (steps[0].ffn.indices != steps[1].ffn.indices).float() + 1
    expected = total - 2 * (per_attn + per_ffn)
    expected += attn_distinct.mean().item() * per_attn + ffn_distinct.mean().item() * per_ffn
    assert report.active_parameters == pytest.approx(expected)


# ---- ModuleFormer ----------------------------------------------------------------------


# A pruned model's routers compute at the unpruned width (RouterSlots); an extended one
# has its inserted rows A' in a parameter of their own.
PRUNED = dict(
    n_layer=2,
    att_experts_per_layer=[3, 2],
    att_expert_slots=[[0, 2, 3], [1, 3]],
    ffd_experts_per_layer=[5, 8],
    ffd_expert_slots=[[0, 1, 4, 6, 7], list(range(8))],
)
EXTENDED = dict(
    n_att_experts=6, n_ffd_experts=10, n_inserted_att_experts=2, n_inserted_ffd_experts=2
)


# IBM's layout (`convert moduleformer`): biased router and K/V projections, untied head.
IBM = dict(router_bias=True, kv_bias=True, tie_word_embeddings=False)


@pytest.mark.parametrize(
    "layout", [{}, PRUNED, EXTENDED, IBM], ids=["plain", "pruned", "extended", "ibm"]
)
def test_moduleformer_matmuls_match_flop_counter(layout):
    # attention_block_size 128 >= T: one dense block
    model, x = moduleformer(**layout), tokens()
    report = inference_flops(model, x, attention="dense")
    counted = count_flops_with_torch(model, x)
    row_sums = weighted_row_sum_flops(model, x)
    assert report.total == sum(counted.values()) - row_sums
    c = report.components
    d, layers, att = model.config.n_embd, model.config.n_layer, model.config.att_hidden
    shared_kv = layers * B * T * 2 * d * 2 * att  # W_k|W_v once per token: an nn.Linear
    assert counted["modformer.grouped_mm"] == c["ffn"] + c["attention_projections"] - shared_kv
    # The stick-breaking matmuls (q.k and p.v), and any weighted row sums.
    assert counted["aten.bmm"] - row_sums == c["attention_scores"]
    # nn.Linear with a bias (IBM's router B and K/V) runs as addmm.
    linear = counted["aten.mm"] + counted.get("aten.addmm", 0)
    assert linear == c["router"] + c["lm_head"] + shared_kv

    causal = inference_flops(model, x)
    assert causal.components["attention_scores"] * 2 * T == c["attention_scores"] * (T + 1)
    assert report.active_parameters == model.active_parameters()


@pytest.mark.parametrize("att_hidden, n_head", [(64, 2), (128, 1)], ids=["kv-proj", "kv-identity"])
def test_moduleformer_attention_projections(att_hidden, n_head):
    model, x = moduleformer(att_hidden=att_hidden, n_head=n_head), tokens()
    report = inference_flops(model, x, attention="dense")
    counted = sum(count_flops_with_torch(model, x).values())
    assert report.total == counted - weighted_row_sum_flops(model, x)
    d, layers, k = model.config.n_embd, model.config.n_layer, model.config.k_att
    # Shared W_k|W_v once per token (none when they are the identity), W_q/W_o per expert.
    shared_kv = 0 if model.transformer.h[0].attn.kv_proj is None else 2 * d * 2 * att_hidden
    per_token = shared_kv + k * (2 * d * att_hidden + 2 * att_hidden * d)
    assert report.components["attention_projections"] == layers * B * T * per_token
    assert (shared_kv == 0) == (att_hidden == d and n_head == 1)


# ---- memory ----------------------------------------------------------------------------


def test_peak_tensor_bytes_follows_live_storages():
    kept = []

    def run():
        a = torch.empty(1000)  # 4000 bytes live
        b = torch.empty(2000)  # 12000: the peak
        del b
        c = torch.empty(500)  # 6000
        kept.append(a.view(10, 100))  # a view allocates nothing
        a.add_(1.0)  # nor does an in-place op
        return c

    assert peak_tensor_bytes(run) == 12000


@pytest.mark.parametrize("build", [gpt, mom, moduleformer], ids=["gpt", "mom", "moduleformer"])
def test_peak_memory_grows_with_seq_len(build):
    model = build()
    short, long = peak_memory(model, 2, 16), peak_memory(model, 2, 64)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert short.parameter_bytes >= params
    assert 0 < short.activation_bytes < long.activation_bytes
    input_bytes = 2 * 16 * 8  # int64 token ids
    assert short.peak_bytes == short.parameter_bytes + input_bytes + short.activation_bytes
    # The logits alone are (B, T, V) fp32 and are alive at the end of the forward.
    assert long.activation_bytes >= 2 * 64 * VOCAB * 4
    assert long.method == "live tensors"


# ---- table and CLI ---------------------------------------------------------------------


def test_cost_table_rows_relative_to_first():
    rows = cost_table(
        [("gpt", gpt().config), ("moduleformer", moduleformer().config)], batch_size=1, seq_len=16
    )
    assert [r.name for r in rows] == ["gpt", "moduleformer"]
    assert rows[0].flops_vs_first == 0.0 and rows[0].memory_vs_first == 0.0
    assert rows[1].flops_vs_first == pytest.approx(
        rows[1].flops_per_token / rows[0].flops_per_token - 1
    )
    assert rows[1].active_parameters < rows[1].parameters
    assert not rows[0].trained and rows[0].val_loss is None
    text = format_cost_table(rows)
    assert text.splitlines()[0].split()[:3] == ["name", "params", "active"]
    assert "%)" in text.splitlines()[2]


def cli(argv: list[str]) -> list[CostRow]:
    parser = argparse.ArgumentParser()
    add_cost_arguments(parser)
    return run_cost(parser.parse_args(argv))


def test_cost_cli_prints_table_and_writes_json(tmp_path, tiny_data_dir, capsys):
    saved = tmp_path / "model"
    gpt().save_pretrained(saved)
    out = tmp_path / "costs.json"
    rows = cli(
        [
            str(saved),
            "--config",
            f"gpt:tiny:vocab_size={VOCAB}",
            "--config",
            f"MoM_E=mom:tiny:K3H1S:vocab_size={VOCAB}",
            "--config",
            f"moduleformer:tiny:vocab_size={VOCAB}",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--data",
            str(tiny_data_dir),
            "--max-val-batches",
            "2",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    names = [
        str(saved),
        f"gpt:tiny:vocab_size={VOCAB}",
        "MoM_E",
        f"moduleformer:tiny:vocab_size={VOCAB}",
    ]
    assert [r.name for r in rows] == names
    for name in names:
        assert name in printed
    payload = json.loads(out.read_text())
    assert payload["seq_len"] == 16 and payload["tokens"] == "data"
    assert [r["name"] for r in payload["rows"]] == names
    # The saved model is trained: it gets a val loss; the random-init ones do not.
    assert payload["rows"][0]["val_loss"] is not None and payload["rows"][1]["val_loss"] is None
    # GPT FLOPs do not depend on the weights: the saved GPT and gpt:tiny cost the same,
    # counted on the first val batch of the data.
    assert payload["rows"][0]["flops_per_token"] == payload["rows"][1]["flops_per_token"]
    first_batch = next(TokenDataset(tiny_data_dir, "val").iter_sequential(16, 2))
    assert payload["rows"][0]["flops_per_token"] == flops_per_token(gpt(), first_batch)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpt", "at least ARCH:PRESET"),
        ("transformer:tiny", "unknown architecture"),
        ("gpt:huge", "unknown preset"),
        ("gpt:tiny:K2H2S", "only mom takes a KaHb name"),
        ("mom:tiny:K9", "bad config spec"),
        ("gpt:tiny:n_layers=3", "unknown field.*n_layers .did you mean n_layer"),
        ("gpt:tiny:=3", "has no field name"),
        ("=gpt:tiny", "label"),
    ],
)
def test_bad_config_spec_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_config_spec(spec)


def test_config_spec_parses_label_name_and_overrides():
    name, config = parse_config_spec("MoE=mom:tiny:K2H2:policy=moe:num_experts=3")
    assert name == "MoE"
    assert (config.K, config.H, config.skip, config.policy) == (2, 2, False, "moe")
    assert config.num_experts == 3
    name, config = parse_config_spec("gpt:tiny:vocab_size=300:bias=false")
    assert name == "gpt:tiny:vocab_size=300:bias=false"
    assert config.vocab_size == 300 and config.bias is False


def test_bad_inputs_are_clear_errors():
    model = gpt()
    with pytest.raises(ValueError, match="at least one MODEL"):
        cli([])
    with pytest.raises(ValueError, match="integer token ids"):
        inference_flops(model, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        inference_flops(model, tokens(), torch.ones(1, T))
    with pytest.raises(ValueError, match="no real token"):
        inference_flops(model, tokens(), torch.zeros(B, T))
    with pytest.raises(ValueError, match="attention must be"):
        inference_flops(model, tokens(), attention="sparse")
    with pytest.raises(ValueError, match="supports"):
        inference_flops(torch.nn.Linear(2, 2), tokens())


# ---- memory with a KV cache (MoM Table 1's measure) ------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: gpt(),
        lambda: mom(mom="K1H2S"),  # key-flag layers: a token may skip a whole attention step
        lambda: mom(mom="K2H2S", router="mlp"),  # no router state
        lambda: mom(mom="K2H3S", K_attn=1, K_ffn=3),
        lambda: mom(mom="K2H2", policy="moe"),
        lambda: mom(mom="K1H2S").to(torch.bfloat16),  # bf16 logits, cache and GRU states
        lambda: moduleformer(),
        lambda: moduleformer(att_hidden=32, n_head=1),  # keys/values narrower than n_embd
    ],
    ids=["gpt", "mom-K1H2S", "mom-mlp", "mom-K_attn1-K_ffn3", "mom-moe", "mom-bf16",
         "moduleformer", "moduleformer-narrow-kv"],
)  # fmt: skip
def test_cache_memory_formula_equals_the_tensors_of_a_forward_with_cache(build):
    from dataclasses import asdict

    from modformer.eval.cache_memory import measured_cache_memory

    model = build()
    formula = model.cache_memory(3, 10)
    measured = measured_cache_memory(model, 3, 10)
    assert asdict(measured) == asdict(formula)
    assert formula.logits == 3 * 10 * VOCAB * model.dtype.itemsize
    config = model.config
    if isinstance(model, MoMForCausalLM):
        assert formula.cache_layers == config.num_attention_layers
        assert (formula.key_flags > 0) == config.attention_may_skip_all
        gru = config.policy == "learned" and config.router == "gru"
        state = 2 * 3 * 10 * config.router_dim * model.dtype.itemsize
        assert formula.router_state == (state if gru else 0)
    else:
        assert formula.cache_layers == config.n_layer and formula.router_state == 0


def test_cache_memory_follows_the_assembled_depth():
    """MoM Table 1's shape: logits + a per-layer term; MoM_E (H=1) holds fewer cache
    layers than the vanilla model, MoM_P (H=6) more."""
    vanilla = MoMConfig.from_preset("small", mom="K1H4", policy="vanilla", H=4)
    picks = {name: MoMConfig.from_preset("small", mom=name) for name in ("K3H1S", "K3H2S", "K2H6S")}
    layers = [c.num_attention_layers for c in (vanilla, *picks.values())]
    assert layers == [12, 6, 8, 16]
    gpt_small = GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=VOCAB))
    one = gpt_small.cache_memory(1, 8)
    two = gpt_small.cache_memory(2, 8)
    assert two.total == 2 * one.total  # linear in batch x tokens
    with pytest.raises(ValueError, match="batch_size and seq_len must be >= 1"):
        gpt_small.cache_memory(0, 8)


def test_cost_cli_cache_memory_mode(tmp_path, capsys):
    out = tmp_path / "costs.json"
    argv = ["--config", f"gpt:tiny:vocab_size={VOCAB}", "--config",
            f"MoM_E=mom:tiny:K1H1S:vocab_size={VOCAB}", "--seq-len", "16", "--batch-size", "2",
            "--memory", "cache", "--json", str(out)]  # fmt: skip
    cli(argv)
    printed = capsys.readouterr().out
    assert "memory with a KV cache" in printed and printed.count("= formula") == 2
    rows = json.loads(out.read_text())["cache_memory"]
    assert [r["name"] for r in rows] == [f"gpt:tiny:vocab_size={VOCAB}", "MoM_E"]
    assert rows[0]["formula"] == rows[0]["measured"]
    # tiny: 4 layers; MoM K1H1S on [1-2-1]: 2 fixed blocks + 1 chunk step = 3 cache layers.
    assert (rows[0]["formula"]["cache_layers"], rows[1]["formula"]["cache_layers"]) == (4, 3)
    assert rows[1]["total_vs_first"] == pytest.approx(
        rows[1]["formula"]["total"] / rows[0]["formula"]["total"] - 1
    )

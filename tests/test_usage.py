"""Module usage statistics: counts against hand counts of the routing outputs, norms,
SKIP, transitions, per-domain data, JSON, CLI and the errors."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_text_inputs
from modformer.analysis.usage import (
    UsageError,
    UsageStats,
    check_same_tokenizer,
    collect_usage,
    collect_usage_on_data,
    format_usage_table,
    merge_usage,
)
from modformer.cli_args import add_usage_arguments
from modformer.commands.usage import run_usage
from modformer.data.corpus import DataError
from modformer.data.prepare import prepare
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM

VOCAB = 257  # the byte tokenizer's


def tiny_moduleformer(**overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    config = ModuleFormerConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_att_experts=4,
        att_hidden=32,
        n_head=2,
        k_att=2,
        n_ffd_experts=5,
        ffd_hidden=32,
        k_ffd=2,
        router_hidden=16,
        **overrides,
    )
    return ModuleFormerForCausalLM(config).eval()


def tiny_mom(mom: str = "K2H3S", **overrides) -> MoMForCausalLM:
    torch.manual_seed(0)
    config = MoMConfig.from_preset(
        "tiny", vocab_size=VOCAB, n_embd=32, n_head=2, router_dim=16, mom=mom, **overrides
    )
    return MoMForCausalLM(config).eval()


def random_batches(n: int = 3, shape: tuple[int, int] = (2, 12)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, shape, generator=g) for _ in range(n)]


def padding_mask(batch: torch.Tensor) -> torch.Tensor:
    """Left padding of 3 tokens on row 0, none on the other rows."""
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    return mask


@pytest.fixture(scope="module")
def two_domain_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("usage_data")
    code = make_text_inputs(root / "code", n_docs=12, seed=0)
    prose = make_text_inputs(root / "prose", n_docs=12, seed=1)
    out = root / "prepared"
    prepare(out, inputs=[f"code={code}", f"prose={prose}"], tokenizer="byte", progress=False)
    return out


# ---- counting ----------------------------------------------------------------------------


def test_moduleformer_counts_match_router_outputs_without_padding():
    model = tiny_moduleformer()
    batches = random_batches()
    stats = collect_usage(model, batches, attention_mask_fn=padding_mask)

    assert stats.arch == "moduleformer"
    assert set(stats.counts) == {"layer0/attn", "layer0/ffn", "layer1/attn", "layer1/ffn"}
    expected = {key: torch.zeros(c.shape, dtype=torch.int64) for key, c in stats.counts.items()}
    tokens = 0
    with torch.no_grad():
        for x in batches:
            mask = padding_mask(x)
            out = model.transformer(input_ids=x, attention_mask=mask, use_cache=False)
            real = mask.reshape(-1).bool()
            tokens += int(real.sum())
            for layer, (att, ffd) in enumerate(out.router_outputs):
                for t in range(real.numel()):  # a plain loop: the reference count
                    if not real[t]:
                        continue
                    for e in att.indices[t].tolist():
                        expected[f"layer{layer}/attn"][e] += 1
                    for e in ffd.indices[t].tolist():
                        expected[f"layer{layer}/ffn"][e] += 1
    assert stats.tokens == tokens == 3 * 2 * 12 - 3 * 3
    for key, counts in stats.counts.items():
        assert counts.dtype == torch.int64
        assert torch.equal(counts, expected[key]), key
        assert int(counts.sum()) == tokens * 2  # k = 2 picks per token
    assert stats.transitions is None


def test_mom_counts_skip_last_and_transitions_match_routing():
    model = tiny_mom("K2H3S")
    batches = random_batches()
    stats = collect_usage(model, batches, attention_mask_fn=padding_mask)

    assert stats.arch == "mom" and stats.skip
    # chunks "[1-2-1]": one chunk of 2 modules, H = 3 steps, SKIP as a third choice
    assert set(stats.counts) == {
        f"chunk0/step{h}/{kind}" for h in range(3) for kind in ("attn", "ffn")
    }
    assert all(c.shape == (3,) for c in stats.counts.values())
    assert set(stats.transitions) == {"chunk0/attn", "chunk0/ffn"}
    assert all(t.shape == (2, 3, 3) for t in stats.transitions.values())

    counts = {key: torch.zeros(3, dtype=torch.int64) for key in stats.counts}
    transitions = {key: torch.zeros(2, 3, 3, dtype=torch.int64) for key in stats.transitions}
    with torch.no_grad():
        for x in batches:
            mask = padding_mask(x)
            out = model(input_ids=x, attention_mask=mask, use_cache=False, return_routing=True)
            steps = {
                (r.step, kind): getattr(r, kind).indices
                for r in out.routing
                for kind in ("attn", "ffn")
            }
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    if not mask[b, t]:
                        continue
                    for (h, kind), index in steps.items():
                        for i in index[b, t].tolist():
                            counts[f"chunk0/step{h}/{kind}"][i] += 1
                        if h + 1 < 3:
                            for i in index[b, t].tolist():
                                for j in steps[(h + 1, kind)][b, t].tolist():
                                    transitions[f"chunk0/{kind}"][h, i, j] += 1
    for key in counts:
        assert torch.equal(stats.counts[key], counts[key]), key
    for key in transitions:
        assert torch.equal(stats.transitions[key], transitions[key]), key
        # every real token adds K * K = 4 pairs to each of the H - 1 = 2 step pairs
        assert int(stats.transitions[key].sum()) == stats.tokens * 4 * 2
    assert stats.tokens == 3 * 2 * 12 - 3 * 3


def test_mom_without_skip_has_no_skip_entry():
    stats = collect_usage(tiny_mom("K1H2"), random_batches(1))
    assert not stats.skip
    assert all(c.shape == (2,) for c in stats.counts.values())
    assert all(t.shape == (1, 2, 2) for t in stats.transitions.values())
    assert all(int(c.sum()) == stats.tokens for c in stats.counts.values())  # K = 1


def test_norms_and_module_frequencies():
    stats = UsageStats(
        arch="mom",
        counts={
            "chunk0/step0/attn": torch.tensor([6, 2, 4]),
            "chunk0/step1/attn": torch.tensor([0, 8, 4]),
        },
        tokens=6,
        skip=True,
    )
    by_max = stats.frequencies()
    assert torch.allclose(by_max["chunk0/step0/attn"], torch.tensor([1.0, 1 / 3, 2 / 3]))
    by_sum = stats.frequencies("sum")
    assert torch.allclose(by_sum["chunk0/step1/attn"], torch.tensor([0.0, 2 / 3, 1 / 3]))
    # pooled over steps, SKIP (the last entry) dropped: [6 + 0, 2 + 8]
    assert torch.equal(stats.module_counts()["chunk0/attn"], torch.tensor([6, 10]))
    assert torch.allclose(stats.module_frequencies()["chunk0/attn"], torch.tensor([0.6, 1.0]))
    assert torch.allclose(
        stats.module_frequencies("sum")["chunk0/attn"], torch.tensor([0.375, 0.625])
    )
    for bad in ("mean", "Max", ""):
        with pytest.raises(UsageError, match="norm must be 'max'"):
            stats.frequencies(bad)
        with pytest.raises(UsageError, match="norm must be 'max'"):
            stats.module_frequencies(bad)


def test_moduleformer_module_frequencies_are_the_layer_frequencies():
    stats = collect_usage(tiny_moduleformer(), random_batches(1))
    freqs, modules = stats.frequencies("sum"), stats.module_frequencies("sum")
    assert freqs.keys() == modules.keys()
    for key in freqs:
        assert torch.equal(freqs[key], modules[key])
        assert abs(float(freqs[key].sum()) - 1.0) < 1e-6


def test_json_round_trip(tmp_path):
    stats = collect_usage(tiny_mom("K2H3S"), random_batches(1))
    stats.per_domain = {"a": merge_usage([stats]), "b": merge_usage([stats, stats])}
    path = tmp_path / "usage.json"
    stats.save(path)
    back = UsageStats.load(path)
    assert back.arch == stats.arch and back.tokens == stats.tokens and back.skip
    for key in stats.counts:
        assert torch.equal(back.counts[key], stats.counts[key])
    for key in stats.transitions:
        assert torch.equal(back.transitions[key], stats.transitions[key])
    assert back.per_domain["b"].tokens == 2 * stats.tokens
    assert torch.equal(
        back.per_domain["b"].counts["chunk0/step0/ffn"], 2 * stats.counts["chunk0/step0/ffn"]
    )
    with pytest.raises(UsageError, match="not a usage-statistics"):
        UsageStats.from_json({"arch": "mom"})


def test_gpt_model_is_a_clear_error():
    gpt = GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=VOCAB, n_embd=32, n_layer=1))
    with pytest.raises(UsageError, match="has no routers"):
        collect_usage(gpt, random_batches(1))


def test_bad_batches_are_clear_errors():
    model = tiny_moduleformer()
    with pytest.raises(UsageError, match=r"\(B, T\)"):
        collect_usage(model, [torch.zeros(5, dtype=torch.long)])
    with pytest.raises(UsageError, match="no batches"):
        collect_usage(model, [])


# ---- data sets -----------------------------------------------------------------------------


def test_per_domain_counts_sum_to_the_whole(two_domain_data):
    model = tiny_moduleformer()
    stats = collect_usage_on_data(model, two_domain_data, block_size=16, batch_size=4)
    assert set(stats.per_domain) == {"code", "prose"}
    meta = json.loads((two_domain_data / "meta.json").read_text())
    for name, (start, end) in meta["splits"]["val"]["domains"].items():
        # non-overlapping windows of 16 inside the domain (the tail is not covered)
        assert stats.per_domain[name].tokens == (end - start) // 16 * 16
    assert stats.tokens == sum(s.tokens for s in stats.per_domain.values())
    for key, counts in stats.counts.items():
        assert torch.equal(counts, sum(s.counts[key] for s in stats.per_domain.values()))

    whole = collect_usage_on_data(
        model, two_domain_data, block_size=16, per_domain=False, max_batches=2
    )
    assert whole.per_domain is None and whole.tokens == 2 * 8 * 16


def test_tokenizer_mismatch_is_a_clear_error(two_domain_data, tmp_path):
    model = tiny_moduleformer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    data_tokenizer = two_domain_data / "tokenizer" / "tokenizer.json"
    shutil.copy(data_tokenizer, model_dir / "tokenizer.json")
    check_same_tokenizer(model_dir, two_domain_data)  # same file: fine
    stats = collect_usage_on_data(model_dir, two_domain_data, block_size=16, max_batches=1)
    assert stats.tokens > 0

    content = json.loads(data_tokenizer.read_text())
    (model_dir / "tokenizer.json").write_text(json.dumps(content, indent=4))  # same content
    check_same_tokenizer(model_dir, two_domain_data)

    content["added_tokens"] = []
    (model_dir / "tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        check_same_tokenizer(model_dir, two_domain_data)
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        collect_usage_on_data(model_dir, two_domain_data, block_size=16)
    loaded = ModuleFormerForCausalLM.from_pretrained(model_dir)  # name_or_path = model_dir
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        collect_usage_on_data(loaded, two_domain_data, block_size=16)


def test_vocab_too_small_is_a_clear_error(two_domain_data):
    torch.manual_seed(0)
    config = MoMConfig.from_preset("tiny", vocab_size=100, n_embd=32, n_head=2, router_dim=16)
    with pytest.raises(DataError, match="vocab_size"):
        collect_usage_on_data(MoMForCausalLM(config), two_domain_data, block_size=16)


def test_cli_writes_json_and_prints_table(two_domain_data, tmp_path, capsys):
    model = tiny_mom("K2H2S")
    model_dir = tmp_path / "mom"
    model.save_pretrained(model_dir)
    parser = argparse.ArgumentParser()
    add_usage_arguments(parser)
    out = tmp_path / "usage.json"
    args = parser.parse_args(
        [
            str(model_dir),
            str(two_domain_data),
            "--norm",
            "sum",
            "--block-size",
            "16",
            "--max-batches",
            "1",
            "--out",
            str(out),
        ]
    )
    stats = run_usage(args)
    printed = capsys.readouterr().out
    assert "SKIP" in printed and "chunk0/step1" in printed
    assert format_usage_table(stats, "sum") in printed
    saved = json.loads(out.read_text())
    assert set(saved["per_domain"]) == {"code", "prose"}
    assert saved["counts"]["chunk0/step0/attn"] == stats.counts["chunk0/step0/attn"].tolist()
    args = parser.parse_args(
        [
            str(model_dir),
            str(two_domain_data),
            "--no-per-domain",
            "--block-size",
            "16",
            "--max-batches",
            "1",
        ]
    )
    assert run_usage(args).per_domain is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_cuda_match_cpu():
    for model in (tiny_moduleformer(), tiny_mom("K2H3S")):
        cpu = collect_usage(model, random_batches(), attention_mask_fn=padding_mask)
        gpu = collect_usage(
            model.to("cuda"), random_batches(), attention_mask_fn=padding_mask, device="cuda"
        )
        assert gpu.tokens == cpu.tokens
        for key in cpu.counts:
            assert gpu.counts[key].device.type == "cpu"
            # routing may flip on near-ties between devices: compare totals exactly and
            # the per-module counts loosely
            assert int(gpu.counts[key].sum()) == int(cpu.counts[key].sum())
            assert (gpu.counts[key] - cpu.counts[key]).abs().max() <= 2

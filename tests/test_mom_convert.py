"""Phase-2 initialisation of MoM from a vanilla GPT (two-phase training, SPEC §2)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from modformer.convert.mom import mom_config_from_gpt, mom_from_vanilla
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM

VOCAB = 61


@torch.no_grad()
def vanilla(n_layer: int = 4, seed: int = 0, spread: bool = True) -> GPTForCausalLM:
    """A tiny GPT; with `spread`, non-trivial LNs and biases so a mis-copied tensor shows."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4)
    model = GPTForCausalLM(config).eval()
    for name, p in model.named_parameters():
        if spread and ("ln" in name or "bias" in name):
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize(
    "chunks, mom_name", [("[1-2-1]", "K1H2"), ("[4]", "K1H4"), ("[2-2]", "K2H2S")]
)
def test_vanilla_policy_reproduces_the_source_logits(chunks, mom_name):
    gpt = vanilla()
    mom = mom_from_vanilla(gpt, chunks, mom_name, policy="vanilla", router_dim=8).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mom(ids).logits, gpt(ids).logits, atol=1e-5, rtol=0)


def test_moe_upcycling_starts_as_the_source_model():
    # Every expert of step h is layer h's FFN and the top-K weights sum to 1.
    gpt = vanilla()
    mom = mom_from_vanilla(gpt, "[1-2-1]", "K2H2", policy="moe", num_experts=3).eval()
    assert mom.transformer.chunks[0].ffn.num_modules == 6
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mom(ids).logits, gpt(ids).logits, atol=1e-5, rtol=0)


def test_layers_land_in_the_chunk_modules():
    gpt = vanilla(n_layer=6)
    mom = mom_from_vanilla(gpt, "[1-3-2]", "K2H3S", router_dim=8)
    source = gpt.transformer.h
    first, second = mom.transformer.chunks
    assert torch.equal(mom.transformer.h[0].attn.c_attn.weight, source[0].attn.c_attn.weight)
    for i in range(3):
        assert torch.equal(first.attn.qkv_weight[i], source[1 + i].attn.c_attn.weight.T)
        assert torch.equal(first.attn.ln_bias[i], source[1 + i].ln_1.bias)
        assert torch.equal(first.ffn.proj_weight[i], source[1 + i].mlp.c_proj.weight.T)
    for i in range(2):
        assert torch.equal(second.ffn.fc_bias[i], source[4 + i].mlp.c_fc.bias)
        assert torch.equal(second.ffn.ln_weight[i], source[4 + i].ln_2.weight)
    assert torch.equal(mom.transformer.wpe.weight, gpt.transformer.wpe.weight)
    assert torch.equal(mom.lm_head.weight, gpt.transformer.wte.weight)


def test_default_chunks_follow_the_presets():
    mom = mom_from_vanilla(vanilla(), mom_name="K2H2S", router_dim=8)
    assert mom.config.chunks == MoMConfig.from_preset("tiny").chunks == "[1-2-1]"
    small = GPTConfig.from_preset("small")
    assert mom_config_from_gpt(small, None, "K2H6S").chunks == "[1-1-4-1-4-1]"


def test_mom_same_ties_the_chunk_to_its_first_layer():
    gpt = vanilla()
    mom = mom_from_vanilla(gpt, "[1-2-1]", "K2H2S", mom_same=True, router_dim=8)
    chunk = mom.transformer.chunks[0]
    assert chunk.attn.qkv_weight.shape[0] == chunk.ffn.fc_weight.shape[0] == 1
    assert torch.equal(chunk.attn.qkv_weight[0], gpt.transformer.h[1].attn.c_attn.weight.T)
    assert torch.equal(chunk.ffn.fc_weight[0], gpt.transformer.h[1].mlp.c_fc.weight.T)


def test_sources_on_disk(tmp_path):
    gpt = vanilla()
    gpt.save_pretrained(tmp_path / "gpt")
    ids = torch.randint(0, VOCAB, (2, 10))
    mom = mom_from_vanilla(tmp_path / "gpt", "[1-2-1]", "K1H2", policy="vanilla").eval()
    with torch.no_grad():
        torch.testing.assert_close(mom(ids).logits, gpt(ids).logits, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=4, n_head=4)
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    mom = mom_from_vanilla(str(tmp_path / "hf"), "[4]", "K1H4", policy="vanilla").eval()
    with torch.no_grad():
        torch.testing.assert_close(mom(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_bad_sources_and_chunks_are_clear_errors(tmp_path):
    gpt = vanilla()
    with pytest.raises(ValueError, match="covers 5 layers but the source model has n_layer=4"):
        mom_from_vanilla(gpt, "[1-3-1]", "K2H3S")
    with pytest.raises(ValueError, match=r"\['n_embd'\] come from the source model"):
        mom_from_vanilla(gpt, "[1-2-1]", "K2H2S", n_embd=64)
    with pytest.raises(ValueError, match="no preset chunk string covers 5 layers"):
        mom_from_vanilla(vanilla(n_layer=5), None, "K2H3S")
    with pytest.raises(ValueError, match="holds no config.json"):
        mom_from_vanilla(tmp_path, "[1-2-1]", "K2H2S")
    mom = mom_from_vanilla(gpt, "[1-2-1]", "K2H2S")
    with pytest.raises(ValueError, match="needs a vanilla GPTForCausalLM, got MoMForCausalLM"):
        mom_from_vanilla(mom, "[1-2-1]", "K2H2S")


def test_vanilla_policy_gradients_equal_the_source_gradients():
    gpt = vanilla().train()
    mom = mom_from_vanilla(gpt, "[1-2-1]", "K1H2", policy="vanilla").train()
    ids = torch.randint(0, VOCAB, (2, 12))
    gpt(ids, labels=ids).loss.backward()
    mom(ids, labels=ids).loss.backward()
    chunk, source = mom.transformer.chunks[0], gpt.transformer.h
    for i in range(2):
        layer = source[1 + i]
        expected = {
            "attn.ln_weight": layer.ln_1.weight.grad,
            "attn.qkv_weight": layer.attn.c_attn.weight.grad.T,
            "attn.proj_bias": layer.attn.c_proj.bias.grad,
            "ffn.ln_bias": layer.ln_2.bias.grad,
            "ffn.fc_weight": layer.mlp.c_fc.weight.grad.T,
            "ffn.proj_weight": layer.mlp.c_proj.weight.grad.T,
        }
        for name, grad in expected.items():
            ours = chunk.get_parameter(name).grad[i]
            torch.testing.assert_close(ours, grad, atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(
        mom.transformer.wte.weight.grad, gpt.transformer.wte.weight.grad, atol=1e-6, rtol=1e-4
    )


def test_learned_routers_train_and_gradients_reach_every_picked_module():
    gpt = vanilla(spread=False)
    torch.manual_seed(0)
    mom: MoMForCausalLM = mom_from_vanilla(gpt, "[1-2-1]", "K2H3S", router_dim=16).train()
    # Counting sequences: the next token is predictable, so a few steps must learn it.
    ids = (torch.randint(0, VOCAB, (4, 1)) + torch.arange(24)) % VOCAB
    out = mom(ids, labels=ids, return_routing=True)
    out.loss.backward()
    chunk = mom.transformer.chunks[0]
    picked_attn = torch.cat([r.attn.indices.flatten() for r in out.routing])
    picked_ffn = torch.cat([r.ffn.indices.flatten() for r in out.routing])
    for m in range(2):  # a module has gradient exactly when some token picked it
        assert (chunk.attn.qkv_weight.grad[m].abs().sum() > 0) == (picked_attn == m).any()
        assert (chunk.ffn.fc_weight.grad[m].abs().sum() > 0) == (picked_ffn == m).any()
    assert (picked_attn < 2).any() and (picked_ffn < 2).any()
    for name, p in chunk.policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    optimizer = torch.optim.AdamW(mom.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = mom(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_router_width_scales_with_the_model_so_parameters_stay_near_the_source():
    """The demo's comparison: MoM K2H3S [1-2-1] from the tiny GPT (d=128, 4096 tokens)
    within 5% of the source's parameters (the fixed default width 256 gave +44%)."""
    from modformer.convert.mom import phase2_router_dim

    gpt = GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=4096))
    source = gpt.num_parameters()
    mom = mom_from_vanilla(gpt, chunks="[1-2-1]", mom_name="K2H3S")
    assert mom.config.router_dim == phase2_router_dim(128) == 32
    assert 1.0 < mom.num_parameters() / source < 1.05
    wide = mom_from_vanilla(gpt, chunks="[1-2-1]", mom_name="K2H3S", router_dim=256)
    assert wide.config.router_dim == 256 and wide.num_parameters() / source > 1.4
    assert phase2_router_dim(16) == 8  # a floor for very small models


def test_reduced_pools_take_layers_spread_in_depth_order():
    """Fig. 3's N_A x N_F pools: n modules of a 4-layer chunk are its layers i * 4 // n."""
    from modformer.convert.mom import spread_layers

    assert spread_layers(4, 4) == [0, 1, 2, 3]
    assert spread_layers(4, 2) == [0, 2] and spread_layers(4, 1) == [0]
    assert spread_layers(4, 3) == [0, 1, 2]
    gpt = vanilla(n_layer=6)
    mom = mom_from_vanilla(
        gpt, "[1-4-1]", "K2H4S", router_dim=8, attn_modules_per_chunk=[2],
        ffn_modules_per_chunk=[1], K_attn=2, K_ffn=1,
    )  # fmt: skip
    chunk, source = mom.transformer.chunks[0], gpt.transformer.h
    assert chunk.attn.num_modules == 2 and chunk.ffn.num_modules == 1
    for module, layer in enumerate([1, 3]):  # the chunk starts at layer 1
        assert torch.equal(chunk.attn.qkv_weight[module], source[layer].attn.c_attn.weight.T)
        assert torch.equal(chunk.attn.ln_bias[module], source[layer].ln_1.bias)
    assert torch.equal(chunk.ffn.fc_weight[0], source[1].mlp.c_fc.weight.T)
    # Routers score each pool's own modules (+ SKIP): 2 + 1 attention, 1 + 1 FFN choices.
    assert chunk.policy.attn_router.out.out_features == 3
    assert chunk.policy.ffn_router.out.out_features == 2
    ids = torch.randint(0, VOCAB, (2, 12))
    out = mom(ids, labels=ids, return_routing=True)
    assert torch.isfinite(out.loss)
    assert all(s.attn.indices.shape[-1] == 2 and s.ffn.indices.shape[-1] == 1 for s in out.routing)


def test_reduced_pools_larger_than_a_chunk_are_a_clear_error():
    with pytest.raises(ValueError, match=r"attn_modules_per_chunk=\[3\] exceeds .* \[2\]"):
        mom_from_vanilla(vanilla(), chunks="[1-2-1]", mom_name="K1H2S", attn_modules_per_chunk=[3])
    with pytest.raises(ValueError, match="ffn_module_slots describe a pruned model"):
        mom_from_vanilla(
            vanilla(), chunks="[1-2-1]", mom_name="K1H2S", ffn_modules_per_chunk=[1],
            ffn_module_slots=[[1]],
        )  # fmt: skip


def test_convert_cli_separate_k_and_reduced_pools(tiny_data_dir, tmp_path, capsys):
    from modformer.cli import main
    from modformer.train.checkpoint import save_model_files

    src = tmp_path / "gpt"
    save_model_files(vanilla(), src, tiny_data_dir / "tokenizer")
    argv = ["convert", "mom", "--from", str(src), "--chunks", "[4]", "--config", "K4H4S"]
    options = ["--attn-modules", "1", "--k-attn", "1", "--k-ffn", "3"]
    assert main([*argv, *options, str(tmp_path / "a")]) == 0
    config = MoMForCausalLM.from_pretrained(tmp_path / "a").config
    assert (config.attn_k, config.ffn_k, config.attn_modules_per_chunk) == (1, 3, [1])
    assert "K(A1,F3)H4S" in capsys.readouterr().out
    assert main([*argv, "--ffn-modules", "two", str(tmp_path / "b")]) == 2
    assert "--ffn-modules 'two'" in capsys.readouterr().err
    # K = 4 over 1 attention module + SKIP: a clear error naming the fix.
    assert main([*argv, "--attn-modules", "1", str(tmp_path / "c")]) == 2
    assert "lower K or keep more modules" in capsys.readouterr().err


def test_convert_cli_router_dim_and_share_map(tiny_data_dir, tmp_path, capsys):
    from modformer.cli import main
    from modformer.train.checkpoint import save_model_files

    src = tmp_path / "gpt"
    save_model_files(vanilla(), src, tiny_data_dir / "tokenizer")
    argv = ["convert", "mom", "--from", str(src), "--chunks", "[1-2-1]"]
    assert main([*argv, "--config", "K2H3S", "--router-dim", "12", str(tmp_path / "a")]) == 0
    assert MoMForCausalLM.from_pretrained(tmp_path / "a").config.router_dim == 12
    shared = [*argv, "--config", "K1H3", "--policy", "parameter_sharing"]
    assert main([*shared, "--share-map", "0,0,1", str(tmp_path / "b")]) == 0
    assert MoMForCausalLM.from_pretrained(tmp_path / "b").config.share_map == [0, 0, 1]
    capsys.readouterr()
    assert main([*shared, "--share-map", "0,x", str(tmp_path / "c")]) == 2
    assert "--share-map '0,x'" in capsys.readouterr().err
    assert main([*shared, "--share-map", "0,5,1", str(tmp_path / "d")]) == 2
    assert "share_map" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()

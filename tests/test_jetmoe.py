"""`convert jetmoe` and `export hf`: JetMoE <-> ModuleFormer, GPT -> GPT2LMHeadModel,
against transformers' own JetMoeForCausalLM / GPT2LMHeadModel built at random."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, JetMoeConfig, JetMoeForCausalLM

from modformer.cli import main
from modformer.convert.export import export_hf
from modformer.convert.gpt2 import ConversionError
from modformer.convert.jetmoe import (
    KEY_MAP,
    load_jetmoe_directory,
    moduleformer_config_from_jetmoe,
)
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def jetmoe_config(**overrides) -> JetMoeConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=24,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    return JetMoeConfig(**{**settings, **overrides})


def random_jetmoe(seed: int = 0, **overrides) -> JetMoeForCausalLM:
    """transformers' own JetMoE with random weights, biases and norm weights."""
    torch.manual_seed(seed)
    model = JetMoeForCausalLM(jetmoe_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.05)
            elif "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def jetmoe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("jetmoe")
    random_jetmoe().save_pretrained(path)
    return path


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded_batch():
    x = tokens(2, 10, seed=1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    x[1, :4] = 0
    return x, mask


@torch.no_grad()
def assert_same_logits(reference, ours, atol: float) -> None:
    """Plain and left-padded logits; JetMoE gets positions counted from the mask (as
    generate() gives them), ours derives them from the mask itself."""
    x = tokens(2, 10)
    torch.testing.assert_close(ours(x).logits, reference(x).logits, atol=atol, rtol=0)
    x, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    expected = reference(x, attention_mask=mask, position_ids=positions).logits
    got = ours(x, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=atol, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_matches_transformers_jetmoe(tmp_path, tied):
    reference = random_jetmoe(seed=2, tie_word_embeddings=tied)
    reference.save_pretrained(tmp_path)
    ours = load_jetmoe_directory(tmp_path)
    config = ours.config
    assert (config.norm_type, config.expert_mlp, config.router_type, config.attention_type) == (
        "rms",
        "swiglu",
        "linear",
        "softmax_rope",
    )
    assert config.rope_theta == 500.0 and config.final_norm_epsilon == 1e-5
    assert config.tie_word_embeddings == tied
    shares = ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    assert shares == tied
    assert_same_logits(reference, ours, atol=1e-4)
    reference.set_attn_implementation("eager")  # JetMoE's written-out attention too
    assert_same_logits(reference, ours, atol=1e-4)


def test_import_keeps_the_checkpoint_dtype(tmp_path):
    reference = random_jetmoe(seed=7).to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    ours = load_jetmoe_directory(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    w_q = reference.model.layers[1].self_attention.experts.input_linear.weight
    assert torch.equal(ours.transformer.h[1].attn.w_q, w_q.transpose(1, 2))


def test_import_gives_the_same_greedy_continuations(jetmoe_dir):
    reference = JetMoeForCausalLM.from_pretrained(jetmoe_dir).eval()
    ours = load_jetmoe_directory(jetmoe_dir)
    x, mask = left_padded_batch()
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = reference.generate(x, attention_mask=mask, **kwargs)
    assert len(expected[:, 10:].unique()) > 3  # a varied continuation, not a repeat
    assert torch.equal(ours.generate(x, attention_mask=mask, **kwargs), expected)


def test_cli_convert_then_export_round_trips(jetmoe_dir, tmp_path, capsys):
    ours_dir, back_dir, again_dir = tmp_path / "ours", tmp_path / "back", tmp_path / "again"
    assert main(["convert", "jetmoe", str(jetmoe_dir), str(ours_dir)]) == 0
    assert main(["export", "hf", str(ours_dir), str(back_dir)]) == 0
    assert (
        "JetMoeForCausalLM" in json.loads((back_dir / "config.json").read_text())["architectures"]
    )
    ours = ModuleFormerForCausalLM.from_pretrained(ours_dir).eval()
    # Plain transformers loads the export: every weight in place, identical logits.
    back, info = JetMoeForCausalLM.from_pretrained(back_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    reference = JetMoeForCausalLM.from_pretrained(jetmoe_dir).eval()
    x = tokens(2, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x).logits, reference(x).logits, atol=0, rtol=0)
    # The exported weights are the original ones, bit for bit.
    original, exported = (
        load_file(jetmoe_dir / "model.safetensors"),
        load_file(back_dir / "model.safetensors"),
    )
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    # import -> export -> import: identical logits.
    again = load_jetmoe_directory(back_dir)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ours(x).logits, atol=0, rtol=0)
    assert main(["convert", "jetmoe", str(back_dir), str(again_dir)]) == 0


def test_jetmoe_aux_loss_is_switch_pooled(tmp_path):
    reference = random_jetmoe(seed=6, output_router_logits=True, aux_loss_coef=0.3)
    reference.save_pretrained(tmp_path)
    ours = load_jetmoe_directory(tmp_path)
    assert ours.config.aux_loss_type == "switch_pooled" and ours.config.aux_loss_weight == 0.3
    x, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # Labels only where the previous token is real: a padded position's logits are
    # meaningless (and differ between the two implementations).
    labels = x.masked_fill(mask == 0, -100)
    labels[1, 4] = -100
    for masked in (False, True):
        with torch.no_grad():
            if masked:
                expected = reference(x, attention_mask=mask, position_ids=positions, labels=labels)
                got = ours(x, attention_mask=mask, labels=labels)
            else:
                expected, got = reference(x, labels=x), ours(x, labels=x)
        torch.testing.assert_close(got.aux_metrics["aux/switch_pooled"], expected.aux_loss)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    # JetMoE without output_router_logits trains with no balance loss.
    assert moduleformer_config_from_jetmoe(jetmoe_config().to_dict()).aux_loss_type == "none"


def test_export_of_a_non_jetmoe_moduleformer_names_the_options(tmp_path):
    model = ModuleFormerForCausalLM(ModuleFormerConfig.from_preset("tiny", vocab_size=VOCAB))
    with pytest.raises(ConversionError, match="norm_type='layer'") as err:
        export_hf(model, tmp_path / "out")
    for option in ("expert_mlp", "router_type", "attention_type", "moe_output_bias"):
        assert option in str(err.value)
    assert not (tmp_path / "out").exists()
    near = ModuleFormerConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        norm_type="rms",
        expert_mlp="swiglu",
        router_type="linear",
        attention_type="softmax_rope",
        moe_output_bias=True,
        layer_norm_epsilon=1e-6,
        n_ffd_experts=8,
        n_att_experts=4,
    )
    with pytest.raises(ConversionError, match="n_att_experts=4 != n_ffd_experts=8"):
        export_hf(ModuleFormerForCausalLM(near), tmp_path / "out")
    # IBM's biased K/V projections have no place in JetMoE's kv_proj.
    ibm_kv = ModuleFormerConfig(**{**near.to_dict(), "n_ffd_experts": 4, "kv_bias": True})
    with pytest.raises(ConversionError, match="kv_bias=True"):
        export_hf(ModuleFormerForCausalLM(ibm_kv), tmp_path / "out")


def _edit_checkpoint(src, dst, edit_weights=None, edit_config=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(src / "model.safetensors")
    if edit_weights:
        edit_weights(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    ("edit_weights", "edit_config", "message"),
    [
        (lambda w: w.update(extra=torch.zeros(1)), None, r"no place in the key map.*'extra'"),
        (lambda w: w.pop("model.layers.1.mlp.bias"), None, r"missing.*h\.1\.mlp\.output_bias"),
        (
            lambda w: w.update({"model.layers.0.mlp.bias": torch.zeros(5)}),
            None,
            r"h\.0\.mlp\.output_bias has shape \(5,\), expected \(32,\)",
        ),
        (None, lambda c: c.update(model_type="llama"), "not 'jetmoe'"),
        (
            None,
            lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0}),
            "rope_type='linear' is not representable",
        ),
        (None, lambda c: c.update(attention_dropout=0.1), "attention_dropout=0.1"),
        (None, lambda c: c.update(activation_function="quick_gelu"), "activation_function"),
    ],
    ids=["unknown_key", "missing_key", "bad_shape", "model_type", "rope_type", "dropout", "act"],
)
def test_bad_checkpoints_are_clear_errors(jetmoe_dir, tmp_path, edit_weights, edit_config, message):
    bad = _edit_checkpoint(jetmoe_dir, tmp_path / "bad", edit_weights, edit_config)
    with pytest.raises(ConversionError, match=message):
        load_jetmoe_directory(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", "jetmoe", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_key_map_covers_every_weight_of_both_models():
    # Every JetMoE weight name and every ModuleFormer weight name has exactly one entry.
    from modformer.convert.jetmoe import _PATTERNS, _REVERSE_PATTERNS

    reference = random_jetmoe(tie_word_embeddings=False)
    for names, patterns in (
        (reference.state_dict().keys(), _PATTERNS),
        (load_jetmoe_like(reference).state_dict().keys(), _REVERSE_PATTERNS),
    ):
        for name in names:
            assert sum(bool(p.match(name)) for p, _ in patterns) == 1, name
    assert len(KEY_MAP) == len({theirs for theirs, _, _ in KEY_MAP})


def load_jetmoe_like(reference: JetMoeForCausalLM) -> ModuleFormerForCausalLM:
    return ModuleFormerForCausalLM(moduleformer_config_from_jetmoe(reference.config.to_dict()))


# ---------------------------------------------------------------- GPT -> GPT2LMHeadModel


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_exports_as_a_native_gpt2(tmp_path, tied):
    torch.manual_seed(3)
    config = GPTConfig(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tied
    )
    ours = GPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    export_hf(ours, tmp_path)
    native, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = tokens(2, 12, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(native.eval()(x).logits, ours(x).logits, atol=1e-5, rtol=0)
    # And back through `convert gpt2`: the same model.
    from modformer.convert.gpt2 import load_gpt2_directory

    if tied:  # the importer produces GPT-2's tied head
        again = load_gpt2_directory(tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(again(x).logits, ours(x).logits, atol=0, rtol=0)


def test_gpt_without_biases_and_other_models_are_clear_errors(tmp_path):
    no_bias = GPTForCausalLM(
        GPTConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, bias=False)
    )
    with pytest.raises(ConversionError, match="bias=False"):
        export_hf(no_bias, tmp_path / "a")
    with pytest.raises(ConversionError, match="no native transformers counterpart"):
        export_hf(torch.nn.Linear(2, 2), tmp_path / "b")

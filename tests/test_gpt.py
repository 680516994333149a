"""Vanilla GPT model: HF integration, KV cache, the GPT-2 importer."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from modformer.convert.gpt2 import ConversionError, convert_gpt2, load_gpt2_directory
from modformer.models.gpt import GPTConfig, GPTForCausalLM


def tiny_config(**kw):
    return GPTConfig.from_preset("tiny", vocab_size=97, n_positions=64, n_layer=2, **kw)


def test_presets_and_validation_name_the_field():
    assert GPTConfig.from_preset("small").n_embd == 768
    assert GPTConfig.from_preset("large").n_layer == 36
    with pytest.raises(Exception, match="n_embd .* divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        GPTConfig.from_preset("huge")
    with pytest.raises(Exception, match="activation_function"):
        GPTConfig(activation_function="swish2")


def test_tied_head_and_loss_matches_manual():
    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config()).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 97, (2, 16))
    out = model(x, labels=x)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, manual)


def test_save_load_and_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "modformer_gpt"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GPTForCausalLM)
    x = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_cached_and_uncached_greedy_decoding_agree():
    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 97, (2, 7))
    kw = dict(
        max_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_too_long_input_is_a_clear_error():
    model = GPTForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="exceeds n_positions=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def _save_hf_gpt2(path, prefix=True, **kw):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=3, n_head=4, **kw)
    hf = GPT2LMHeadModel(cfg).eval()
    # Non-trivial biases and norms so a transposition or a skipped tensor would show.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "bias" in name:
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    if not prefix:  # the original OpenAI layout has no `transformer.` prefix
        from safetensors.torch import load_file, save_file

        sd = load_file(path / "model.safetensors")
        save_file(
            {k.removeprefix("transformer."): v for k, v in sd.items()},
            path / "model.safetensors",
            metadata={"format": "pt"},
        )
    return hf


@pytest.mark.parametrize("prefix", [True, False])
def test_gpt2_import_matches_transformers(tmp_path, prefix):
    hf = _save_hf_gpt2(tmp_path, prefix=prefix)
    ours = load_gpt2_directory(tmp_path)
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=0)
        # Right-padded batch with an attention mask: real positions must agree.
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, 14:] = 0
        a, b = ours(x, attention_mask=mask).logits, hf(x, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)
        # Left padding with position ids from the mask, as generate() does.
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[0, :5] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        a = ours(x, attention_mask=mask, position_ids=pos).logits
        b = hf(x, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-4, rtol=0)


def test_gpt2_convert_saves_loadable_model(tmp_path):
    hf = _save_hf_gpt2(tmp_path / "src")
    convert_gpt2(tmp_path / "src", tmp_path / "dst")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    x = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_gpt2_import_bad_inputs(tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        load_gpt2_directory(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        load_gpt2_directory(tmp_path / "empty")
    _save_hf_gpt2(tmp_path / "trunc")
    st = tmp_path / "trunc" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="unreadable or truncated"):
        load_gpt2_directory(tmp_path / "trunc")


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", vocab_size=500, n_layer=8)
    model = GPTForCausalLM(cfg)
    residual = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    other = torch.cat([b.attn.c_attn.weight.flatten() for b in model.transformer.h])
    assert abs(residual.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert abs(other.std().item() - 0.02) < 0.001
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)

"""Smoke tests of what depends most on the installed transformers / tokenizers releases.

CI runs this file a second time on the oldest releases `pyproject.toml` declares
(`make test-oldest`), so it covers the integration points in one place: import and Auto
registration, one training step per architecture, a tokenizer trained with `tokenizers`,
and cached `generate()` against an argmax loop over full forwards, with and without left
padding (transformers 5.24 renamed the cache argument `generate()` passes to the model;
a model that missed it decoded every token after the first without context).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import modformer
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.models.outputs import output_cache

VOCAB = 53


def _gpt() -> GPTForCausalLM:
    return GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=VOCAB, n_positions=48))


def _mom() -> MoMForCausalLM:
    config = MoMConfig(
        vocab_size=VOCAB,
        n_positions=48,
        n_embd=32,
        n_head=4,
        router_dim=16,
        chunks="[1-2-1]",
        K=2,
        H=3,
        skip=True,
    )
    return MoMForCausalLM(config)


def _moduleformer() -> ModuleFormerForCausalLM:
    config = ModuleFormerConfig.from_preset(
        "tiny", vocab_size=VOCAB, n_layer=2, attention_block_size=8
    )
    return ModuleFormerForCausalLM(config)


def _jetmoe_style() -> ModuleFormerForCausalLM:
    """ModuleFormer with JetMoE's options (RoPE softmax attention, RMSNorm, SwiGLU, ...)."""
    config = ModuleFormerConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        n_layer=2,
        norm_type="rms",
        expert_mlp="swiglu",
        router_type="linear",
        attention_type="softmax_rope",
        moe_output_bias=True,
        activation_function="silu",
    )
    return ModuleFormerForCausalLM(config)


ARCHITECTURES = {
    "gpt": _gpt,
    "mom": _mom,
    "moduleformer": _moduleformer,
    "moduleformer_jetmoe": _jetmoe_style,
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[arch]()
    with torch.no_grad():  # larger weights than the init, so routing differs per token
        for name, p in model.named_parameters():
            if "router" in name or "wte" in name:
                p.normal_(0.0, 1.0)
    return model.eval()


def _full_forward_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def argmax_loop(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: one full forward (no cache) per new token."""
    for _ in range(steps):
        logits = model(
            ids,
            attention_mask=mask,
            position_ids=_full_forward_positions(mask),
            use_cache=False,
        ).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
        mask = torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("left_padding", [False, True], ids=["unpadded", "left-padded"])
def test_cached_generate_equals_argmax_loop_over_full_forwards(arch, left_padding):
    model = build(arch)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left_padding:
        ids[1, :3], mask[1, :3] = 0, 0
    steps = 9
    cached = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    assert torch.equal(cached, argmax_loop(model, ids, mask, steps))
    # The continuation must depend on the context (a model that drops the cache decodes
    # each new token from itself alone, which this catches even for a constant output).
    assert not torch.equal(cached[0, 7:], cached[1, 7:])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_cache_is_accepted_under_both_names(arch):
    model = build(arch)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = model(ids[:, :-1], use_cache=True)
            cache = output_cache(prefix)
            step = model(ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-6)
        with pytest.raises(ValueError, match="not both"):
            model(ids, cache=cache, past_key_values=output_cache(model(ids[:, :1], use_cache=True)))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_training_step_and_auto_class_round_trip(arch, tmp_path):
    model = build(arch).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):  # the same batch twice: the step must lower its loss
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_activation_checkpointing_gives_the_plain_gradients(arch):
    """The switch exists under its current name on every supported transformers release."""
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        model = build(arch).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_tokenizer_trains_and_round_trips(tmp_path):
    from modformer.data.tokenizer import load_hf_tokenizer, train_bpe_tokenizer

    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(200)]
    train_bpe_tokenizer(iter(docs), vocab_size=300).tokenizer.save_pretrained(tmp_path)
    loaded = load_hf_tokenizer(tmp_path).tokenizer
    text = "def f7(x):\n    return x + 7\n"
    ids = loaded(text).input_ids
    assert loaded.decode(ids) == text and len(ids) < len(text.encode())
    assert modformer.__version__


pytest_plugins = ["pytester"]


@pytest.mark.allow_deprecations  # the inner run's deprecations are on purpose
def test_a_transformers_deprecation_fails_the_test(pytester):
    """The suite's guard (conftest.py) catches both channels transformers reports on."""
    from pathlib import Path

    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        test_probe="""
        import torch
        from transformers.modeling_outputs import CausalLMOutputWithPast
        from transformers.utils import logging

        def test_logger_channel():
            logging.get_logger("transformers.x").warning_once("`a` is deprecated, use `b`")

        def test_warnings_channel():
            from transformers.utils.deprecation import deprecate_kwarg

            @deprecate_kwarg("old", "99.0", new_name="new")
            def f(new=None):
                return new

            f(old=1)

        def test_clean():
            CausalLMOutputWithPast(logits=torch.zeros(1))
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)  # the two probes fail at teardown
    result.stdout.fnmatch_lines(["*transformers reported a deprecation*"])


def test_demo_sample_is_checked_against_full_forwards(tiny_data_dir):
    from modformer.data.tokenizer import load_hf_tokenizer
    from modformer.generation import greedy_sample_checked

    tokenizer = load_hf_tokenizer(tiny_data_dir / "tokenizer").tokenizer
    model = GPTForCausalLM(
        GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, n_positions=64)
    ).eval()
    text = greedy_sample_checked(model, tokenizer, "def ", max_new_tokens=12)
    assert len(tokenizer(text).input_ids) >= 1

    # A model that drops the cache it is given (the transformers 5.24 failure) is caught.
    forward = model.forward

    def forgetful_forward(*args, **kwargs):
        for name in ("cache", "past_key_values", "attention_mask"):
            kwargs.pop(name, None)
        return forward(*args, **kwargs)

    model.forward = forgetful_forward
    with pytest.raises(RuntimeError, match="disagrees with full forwards"):
        greedy_sample_checked(model, tokenizer, "def ", max_new_tokens=12)

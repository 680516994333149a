"""Generation past the model's context (defect 1): a sliding window like nanoGPT's sampler
for learned positions (GPT, MoM); ModuleFormer has no position limit."""

from __future__ import annotations

import pytest
import torch

from modformer.cli import main
from modformer.generation import context_limit, generate_ids
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM

N_POSITIONS = 12


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt":
        config = GPTConfig(vocab_size=50, n_positions=N_POSITIONS, n_embd=16, n_head=2, n_layer=2)
        return GPTForCausalLM(config).eval()
    if arch == "mom":
        config = MoMConfig.from_preset(
            "tiny", vocab_size=50, n_positions=N_POSITIONS, n_embd=16, n_head=2
        )
        return MoMForCausalLM(config).eval()
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=50, n_positions=N_POSITIONS)
    return ModuleFormerForCausalLM(config).eval()


@torch.no_grad()
def _cropping_argmax_reference(model, ids: torch.Tensor, new: int, window: int) -> torch.Tensor:
    """nanoGPT's sampler, greedy: crop to the last `window` tokens, full forward, argmax."""
    for _ in range(new):
        logits = model(ids[:, -window:], use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("arch", ["gpt", "mom"])
def test_greedy_generation_past_the_context_slides_the_window(arch):
    model = _model(arch)
    assert context_limit(model) == N_POSITIONS
    prompt = torch.tensor([[3, 7, 1, 4]])
    out = generate_ids(model, prompt, max_new_tokens=3 * N_POSITIONS, greedy=True)
    assert out.shape == (1, 4 + 3 * N_POSITIONS)
    expected = _cropping_argmax_reference(model, prompt, 3 * N_POSITIONS, N_POSITIONS)
    assert torch.equal(out, expected)
    # Within the context, the cached part is plain generate().
    inside = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=N_POSITIONS - 4,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(out[:, :N_POSITIONS], inside)


def test_prompt_longer_than_the_context_keeps_its_tail_and_sampling_works():
    model = _model("gpt")
    prompt = torch.arange(2 * N_POSITIONS)[None] % 50
    out = generate_ids(model, prompt, max_new_tokens=5, greedy=True)
    expected = _cropping_argmax_reference(model, prompt[:, -N_POSITIONS:], 5, N_POSITIONS)
    assert torch.equal(out, expected)
    torch.manual_seed(1)
    sampled = generate_ids(model, prompt[:, :3], max_new_tokens=2 * N_POSITIONS, top_k=5)
    assert sampled.shape == (1, 3 + 2 * N_POSITIONS)
    assert int(sampled.max()) < 50


def test_moduleformer_has_no_context_limit():
    model = _model("moduleformer")
    assert context_limit(model) is None
    prompt = torch.tensor([[3, 7, 1, 4]])
    out = generate_ids(model, prompt, max_new_tokens=2 * N_POSITIONS, greedy=True)
    assert out.shape == (1, 4 + 2 * N_POSITIONS)


def test_cli_generates_more_tokens_than_positions(tmp_path, tiny_data_dir, capsys):
    """The issue's case: `modformer generate MODEL --max-new-tokens 300` on a small model."""
    from modformer.train.checkpoint import atomic_save_model

    config = GPTConfig(vocab_size=257, n_positions=16, n_embd=16, n_head=2, n_layer=1)
    atomic_save_model(GPTForCausalLM(config), tmp_path / "m", tiny_data_dir / "tokenizer")
    code = main(["generate", str(tmp_path / "m"), "--prompt", "def ", "--max-new-tokens", "40"])
    assert code == 0
    assert capsys.readouterr().out.startswith("def ")
    # A prompt longer than the context (byte tokens) keeps its tail; greedy text is the
    # decode of generate_ids' new tokens.
    from modformer.generation import generate_text
    from modformer.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    prompt = "def alpha(x): return x\n" * 3
    text = generate_text(model, tokenizer, prompt, max_new_tokens=20, greedy=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] > 16
    new = generate_ids(model, ids, 20, greedy=True)[0, 16:]
    assert text == tokenizer.decode(new, skip_special_tokens=False)

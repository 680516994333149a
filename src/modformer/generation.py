"""Text generation from a saved model: prompt -> text, via HF `generate()`."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Model types whose learned position embeddings cap the sequence at n_positions.
LEARNED_POSITIONS = ("modformer_gpt", "modformer_mom")


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    greedy: bool = False,
    seed: int = 0,
) -> str:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(
            f"temperature must be a finite number > 0 for sampling, got {temperature}; or use "
            "greedy decoding"
        )
    if not greedy and top_k is not None and top_k < 1:
        raise ValueError(
            f"top_k must be >= 1, got {top_k}; to sample from the whole vocabulary pass the "
            f"vocabulary size ({model.config.vocab_size})"
        )
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}: they "
            "do not belong together; use the tokenizer the model was trained with"
        )
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    # Learned position embeddings end at n_positions (ModuleFormer has none).
    context = getattr(model.config, "n_positions", None)
    learned = context is not None and model.config.model_type in LEARNED_POSITIONS
    if learned and ids.shape[1] + max_new_tokens > context:
        raise ValueError(
            f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {context} tokens; shorten the prompt or lower "
            "max_new_tokens"
        )
    torch.manual_seed(seed)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else top_k,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=None,  # keep going past document ends: the demo shows a fixed length
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


@torch.no_grad()
def argmax_decode(model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding the slow way, one full forward without a cache per new token: the
    reference that cached `generate()` must reproduce token for token."""
    for _ in range(max_new_tokens):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def greedy_sample_checked(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, max_new_tokens: int
) -> str:
    """A greedy continuation of `prompt` by cached `generate()`, checked token for token
    against `argmax_decode`. Raises if they differ: a KV cache the model never received (as
    when transformers 5.24 renamed the argument) decodes without context, silently."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    cached = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=None,
    )
    reference = argmax_decode(model, ids, max_new_tokens)
    if not torch.equal(cached, reference):
        import transformers

        first = int((cached[0] != reference[0]).nonzero()[0])
        raise RuntimeError(
            f"cached generate() disagrees with full forwards from token {first} on "
            f"(transformers {transformers.__version__}); install the versions in constraints.txt"
        )
    return tokenizer.decode(cached[0, ids.shape[1] :], skip_special_tokens=False)

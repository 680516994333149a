"""Text generation from a saved model: prompt -> text, via HF `generate()` within the
model's context and a sliding window past it."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast


def context_limit(model: PreTrainedModel) -> int | None:
    """The most tokens the model can see at once: the size of its learned position
    embedding (GPT, MoM), or None when it has none (ModuleFormer: stick-breaking attention
    has no position limit, so its context only costs time)."""
    wpe = getattr(model.base_model, "wpe", None)
    return wpe.num_embeddings if isinstance(wpe, torch.nn.Embedding) else None


def _next_token(
    logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None
) -> torch.Tensor:
    """One token per row from last-position logits, as HF's sampler does it (temperature,
    then top-k, then a draw from the softmax)."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1)


@torch.no_grad()
def sliding_window_decode(
    model: PreTrainedModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    window: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Continue `ids` past the model's context as nanoGPT's sampler does: each new token is
    predicted from the last `window` tokens, re-encoded without a cache (positions restart
    at 0 in every window, so cached keys from an earlier window would be at wrong positions)."""
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:], use_cache=False).logits[:, -1]
        ids = torch.cat([ids, _next_token(logits, greedy, temperature, top_k)], dim=1)
    return ids


def generate_ids(
    model: PreTrainedModel,
    ids: torch.Tensor,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 0.8,
    top_k: int | None = 50,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """`ids` (one unpadded row) plus `max_new_tokens` tokens, however long that is. Within
    the model's context this is cached `generate()`; past it (GPT, MoM: learned positions)
    the context slides: a prompt longer than the context keeps its last tokens, and once
    the window is full every token is predicted from the last `context_limit` tokens."""
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
    window = context_limit(model)
    if window is not None and ids.shape[1] > window:
        ids = ids[:, -window:]
    cached = max_new_tokens if window is None else min(max_new_tokens, window - ids.shape[1])
    if cached > 0:
        ids = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=cached,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_k=None if greedy else top_k,
            pad_token_id=pad_token_id,
            eos_token_id=None,  # keep going past document ends: a fixed length is asked for
        )
    if max_new_tokens > cached:
        ids = sliding_window_decode(
            model, ids, max_new_tokens - cached, window, greedy, temperature, top_k
        )
    return ids


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
    """The continuation of `prompt` (any number of tokens; see `generate_ids`)."""
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
    torch.manual_seed(seed)
    out = generate_ids(
        model, ids, max_new_tokens, greedy, temperature, top_k, tokenizer.eos_token_id
    )
    window = context_limit(model)
    kept = ids.shape[1] if window is None else min(ids.shape[1], window)  # prompt as cropped
    return tokenizer.decode(out[0, kept:], skip_special_tokens=False)


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

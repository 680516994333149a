"""What both fine-tuning tasks share: tokenising, padding, batches, and the AdamW
loop with linear warm-up and decay (transformers' schedule)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from modformer.eval.finetune_config import FinetuneConfig

log = logging.getLogger("modformer.finetune")

IGNORE_INDEX = -100  # label value the causal-LM loss skips


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(eos id, pad id). The eos token marks the end of the input (and separates sentence
    pairs); the pad id is only ever seen behind a zero attention mask."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos token; save the model with the tokenizer of its "
            "prepared data (it always has <|endoftext|>)"
        )
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def resolve_max_length(model: PreTrainedModel, max_length: int | None) -> int:
    """The longest input the model takes: ``max_length`` if given (capped by the model's
    ``n_positions``), else ``n_positions``."""
    limit = getattr(model.config, "n_positions", None)
    if max_length is None:
        if limit is None:
            raise ValueError(
                f"{type(model).__name__} has no n_positions limit; pass max_length explicitly"
            )
        return int(limit)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if limit is not None and max_length > limit:
        raise ValueError(
            f"max_length {max_length} exceeds the model's n_positions ({limit}); "
            f"use max_length <= {limit}"
        )
    return max_length


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, longest); padded on the right unless ``left``."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if left else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _batch_indices(num_examples: int, cfg: FinetuneConfig) -> Iterator[list[int]]:
    """Index batches for ``cfg.total_steps`` steps: a fresh shuffle every epoch, the last
    short batch of an epoch kept."""
    generator = torch.Generator().manual_seed(cfg.seed)
    emitted = 0
    total = cfg.total_steps(num_examples)
    while True:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples, cfg.batch_size):
            if emitted == total:
                return
            emitted += 1
            yield order[start : start + cfg.batch_size]


def optimize(
    module: nn.Module,
    num_examples: int,
    step_loss: Callable[[list[int]], torch.Tensor],
    cfg: FinetuneConfig,
) -> dict[str, float]:
    """AdamW over ``cfg.total_steps`` batches; ``step_loss(indices)`` returns the loss of
    one batch. Returns the mean training loss of the first and last tenth of the steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    total = cfg.total_steps(num_examples)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total)
    module.train()
    losses = []
    started = time.perf_counter()
    for step, indices in enumerate(_batch_indices(num_examples, cfg)):
        loss = step_loss(indices)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (step + 1) % cfg.log_interval == 0:
            recent = float(torch.stack(losses[-cfg.log_interval :]).mean())
            log.info("step %d/%d  loss %.4f", step + 1, total, recent)
    module.eval()
    curve = torch.stack(losses).float().cpu().numpy()
    tenth = max(1, len(curve) // 10)
    return {
        "train_steps": len(curve),
        "train_loss_first": float(curve[:tenth].mean()),
        "train_loss_last": float(curve[-tenth:].mean()),
        "train_seconds": time.perf_counter() - started,
    }

"""Language-model evaluation: loss and perplexity over a token stream, and the unigram
baseline the demo prints beside it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from modformer.train.evaluate import evaluate_batches


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `eval_tokens` under the add-one-smoothed unigram
    distribution of `train_tokens`: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[
        :vocab_size
    ]
    probs = (counts + 1.0) / (counts.sum() + vocab_size)
    eval_counts = np.bincount(np.asarray(eval_tokens, dtype=np.int64), minlength=vocab_size)[
        :vocab_size
    ]
    return float(-(eval_counts * np.log(probs)).sum() / max(eval_counts.sum(), 1))


def _take(batches: Iterable[torch.Tensor], max_batches: int | None) -> Iterable[torch.Tensor]:
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def evaluate_split(
    model: nn.Module,
    data_dir: str,
    split: str = "val",
    block_size: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
    per_domain: bool = False,
    domains: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Loss/perplexity over a prepared split, as a whole and (optionally) per domain.

    Windows are non-overlapping and in order, so the figure is deterministic.
    """
    from modformer.data.dataset import TokenDataset

    ds = TokenDataset(data_dir, split, domains=domains)
    ds.check_vocab_fits(model.config.vocab_size)
    results = {
        "all": evaluate_batches(
            model, _take(ds.iter_sequential(block_size, batch_size), max_batches), device
        )
    }
    if per_domain:
        for name in ds.domains:
            batches = ds.iter_sequential(block_size, batch_size, domain=name)
            results[name] = evaluate_batches(model, _take(batches, max_batches), device)
    return results


def evaluate_text_file(
    model: nn.Module,
    tokenizer,
    path: str,
    block_size: int = 128,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, float]:
    """Loss/perplexity of a UTF-8 text file, tokenised with the model's tokenizer."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p} is not UTF-8 text") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < 2:
        raise ValueError(f"{p} holds fewer than 2 tokens; nothing to evaluate")
    block = min(block_size, len(ids))
    n = (len(ids) // block) * block
    windows = ids[:n].view(-1, block)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    return evaluate_batches(model, batches, device)

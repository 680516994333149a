"""Summarisation as conditional generation: the causal LM fine-tuned on
`document + separator + summary + eos` (loss on the summary), scored with ROUGE."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modformer.eval.downstream.records import read_records
from modformer.eval.downstream.training import (
    IGNORE_INDEX,
    encode_texts,
    optimize,
    pad_batch,
    resolve_max_length,
    special_ids,
)
from modformer.eval.finetune_config import DEFAULT_SEPARATOR, FinetuneConfig

log = logging.getLogger("modformer.finetune")


@dataclass
class SummarizationTask:
    document_column: str = "document"
    summary_column: str = "summary"
    separator: str = DEFAULT_SEPARATOR
    max_summary_tokens: int = 64  # summary tokens kept for training and generated at most

    def __post_init__(self) -> None:
        if self.max_summary_tokens < 1:
            raise ValueError(f"max_summary_tokens must be >= 1, got {self.max_summary_tokens}")
        if not self.separator:
            raise ValueError("the summarisation separator must not be empty")


def _separator_ids(tokenizer: PreTrainedTokenizerBase, task: SummarizationTask) -> list[int]:
    return encode_texts(tokenizer, [task.separator])[0]


def encode_for_summarization(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    task: SummarizationTask,
    max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record: ``document + separator + summary + eos``, labels
    -100 on the document and separator so only the summary is learned. The summary is
    cut to ``max_summary_tokens``, then the document's end is cut to fit ``max_length``."""
    eos, _ = special_ids(tokenizer)
    separator = _separator_ids(tokenizer, task)
    documents = encode_texts(tokenizer, [str(r[task.document_column]) for r in records])
    summaries = encode_texts(tokenizer, [str(r[task.summary_column]) for r in records])
    examples = []
    for document, summary in zip(documents, summaries):
        target = summary[: task.max_summary_tokens] + [eos]
        room = max_length - len(separator) - len(target)
        if room < 1:
            raise ValueError(
                f"max_length {max_length} cannot hold the separator ({len(separator)} tokens) "
                f"and a summary of up to {task.max_summary_tokens} tokens; lower "
                "max_summary_tokens or raise max_length"
            )
        prompt = document[:room] + separator
        examples.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
    return examples


def summarization_prompts(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    task: SummarizationTask,
    max_length: int,
) -> list[list[int]]:
    """``document + separator`` per record, the document cut so that the prompt plus
    ``max_summary_tokens`` generated tokens fit ``max_length``."""
    separator = _separator_ids(tokenizer, task)
    room = max_length - len(separator) - task.max_summary_tokens
    if room < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for the document after the separator "
            f"and {task.max_summary_tokens} summary tokens; lower max_summary_tokens"
        )
    documents = encode_texts(tokenizer, [str(r[task.document_column]) for r in records])
    return [document[:room] + separator for document in documents]


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[list[int]]:
    """The greedy continuation of each prompt, up to (not including) the first eos, at
    most ``max_new_tokens`` tokens.

    Batches are left-padded; ``generate()`` derives position ids from the attention mask,
    so each prompt is continued exactly as it would be alone.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    continuations = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[start : start + batch_size], pad_token_id, left=True)
        out = model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        for row in out[:, ids.shape[1] :].cpu().tolist():
            continuations.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    model.train(was_training)
    return continuations


def generate_summaries(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy summaries (decoded text) of ``document + separator`` prompts."""
    eos, pad = special_ids(tokenizer)
    continuations = greedy_continuations(model, prompts, max_new_tokens, eos, pad, batch_size)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in continuations]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (Porter stemming), with the `rouge-score` package."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ValueError(
            "ROUGE needs the rouge-score package: pip install rouge-score "
            "(or pip install 'modformer[eval]')"
        ) from None
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must match"
        )
    if not references:
        raise ValueError("no summaries to score")
    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for name in names:
            totals[name] += scores[name].fmeasure
    return {name: total / len(references) for name, total in totals.items()}


def score_summarizer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: SummarizationTask,
    path: str | Path,
    max_length: int,
    batch_size: int = 16,
) -> tuple[dict[str, float], list[str]]:
    """ROUGE of greedy summaries of the documents in ``path`` against its summaries, and
    the generated summaries."""
    records = read_records(path, (task.document_column, task.summary_column))
    prompts = summarization_prompts(tokenizer, records, task, max_length)
    predictions = generate_summaries(model, tokenizer, prompts, task.max_summary_tokens, batch_size)
    references = [str(r[task.summary_column]) for r in records]
    metrics = rouge_scores(predictions, references)
    metrics["examples"] = len(records)
    return metrics, predictions


def finetune_summarizer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_path: str | Path,
    task: SummarizationTask | None = None,
    cfg: FinetuneConfig | None = None,
    eval_path: str | Path | None = None,
) -> tuple[dict[str, Any], list[str] | None]:
    """Fine-tune the causal LM ``model`` in place on document -> summary pairs (loss on
    the summary tokens only, plus the model's own auxiliary loss); score ROUGE on
    ``eval_path`` when given. Returns the metrics and the generated eval summaries."""
    task = task or SummarizationTask()
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    records = read_records(train_path, (task.document_column, task.summary_column))
    max_length = resolve_max_length(model, cfg.max_length)
    examples = encode_for_summarization(tokenizer, records, task, max_length)
    _, pad_id = special_ids(tokenizer)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)

    def step_loss(indices: list[int]) -> torch.Tensor:
        ids, mask = pad_batch([examples[i][0] for i in indices], pad_id)
        labels, _ = pad_batch([examples[i][1] for i in indices], IGNORE_INDEX)
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            labels=labels.to(device),
            use_cache=False,
        )
        return out.loss

    metrics: dict[str, Any] = {"task": "summarize", "train_examples": len(records)}
    metrics.update(optimize(model, len(records), step_loss, cfg))
    predictions = None
    if eval_path is not None:
        metrics["eval"], predictions = score_summarizer(
            model, tokenizer, task, eval_path, max_length, cfg.eval_batch_size
        )
    return metrics, predictions

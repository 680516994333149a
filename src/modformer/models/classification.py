"""Sequence classification / regression heads for every modformer architecture, following
Hugging Face's ``...ForSequenceClassification`` conventions (GPT-2, Llama):

- the architecture's transformer stack under its ``base_model_prefix`` (``transformer``),
  and a ``score`` Linear from the hidden size to ``config.num_labels``;
- pooling on the last real token: in a causal model only the last position has read the
  whole input. With an ``attention_mask`` that is its rightmost 1 (left or right
  padding); without one, the rightmost token that is not ``config.pad_token_id`` (HF's
  rule), or the last position when no pad id is set. The mask comes first because our
  fine-tuning pads with the eos id, which is also the token the head reads;
- the loss from ``config.problem_type`` (``regression``: MSE, ``single_label_classification``:
  cross-entropy, ``multi_label_classification``: BCE with logits), inferred from
  ``num_labels`` and the label dtype when unset, as HF does;
- ``num_labels``, ``id2label``, ``label2id`` and ``problem_type`` live in the config, so
  ``AutoModelForSequenceClassification.from_pretrained(DIR)`` restores the head.

``config.classifier_dropout`` (default 0) is the dropout on the pooled state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def last_token_indices(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    shape: tuple[int, int],
    pad_token_id: int | None,
    device: torch.device,
) -> torch.Tensor:
    """(B,) index of the last real token of each row of a (B, T) batch (see the module
    docstring)."""
    batch, seq_len = shape
    positions = torch.arange(seq_len, device=device)
    if attention_mask is not None:
        real = attention_mask.to(device).bool()
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.to(device) != pad_token_id
    else:
        return torch.full((batch,), seq_len - 1, dtype=torch.long, device=device)
    # argmax of position * real is the rightmost real position (0 for an empty row).
    return (positions * real).argmax(dim=-1)


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None, num_labels: int
) -> tuple[torch.Tensor, str]:
    """(loss, problem_type); an unset problem_type is inferred as HF does."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.float()
    if problem_type == "regression":
        target = labels.float()
        loss = (
            F.mse_loss(logits.squeeze(-1), target)
            if num_labels == 1
            else F.mse_loss(logits, target)
        )
    elif problem_type == "single_label_classification":
        loss = F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    elif problem_type == "multi_label_classification":
        loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    else:
        raise ValueError(f"problem_type {problem_type!r} is unknown; choose one of {PROBLEM_TYPES}")
    return loss, problem_type


class SequenceClassificationMixin:
    """The body of ``<Arch>ForSequenceClassification``; a subclass names its stack class:

    class GPTForSequenceClassification(SequenceClassificationMixin, GPTPreTrainedModel):
        base_model_class = GPTModel
    """

    base_model_class: type[nn.Module]

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {config.num_labels}")
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, self.base_model_class(config))
        hidden_size = self.base_model.get_input_embeddings().embedding_dim
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.score = nn.Linear(hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base_model.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        last = last_token_indices(
            input_ids, attention_mask, hidden.shape[:2], self.config.pad_token_id, hidden.device
        )
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss, problem_type = sequence_classification_loss(
                logits, labels.to(logits.device), self.config.problem_type, self.num_labels
            )
            self.config.problem_type = problem_type
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)

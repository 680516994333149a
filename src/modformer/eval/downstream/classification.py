"""Sequence classification / regression: a linear head on the last real token's final
hidden state (the architecture's HF ...ForSequenceClassification), fine-tuned and scored."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modformer.eval.downstream.metrics import classification_metrics, regression_metrics
from modformer.eval.downstream.records import read_records
from modformer.eval.downstream.training import (
    encode_texts,
    optimize,
    pad_batch,
    resolve_max_length,
    special_ids,
)
from modformer.eval.finetune_config import FinetuneConfig
from modformer.models.model_card import Provenance

log = logging.getLogger("modformer.finetune")

CLASSIFIER_META_FILE = "classifier.json"


def last_hidden_states(
    lm: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T, D) final hidden states (after the final norm): what the LM head reads.

    Uses ``lm.base_model``, the stack named by the model's ``base_model_prefix``, so it
    works for every modformer architecture without knowing its module names.
    """
    base = lm.base_model
    if base is lm:
        raise ValueError(
            f"{type(lm).__name__} has no base model under base_model_prefix "
            f"{lm.base_model_prefix!r}; pass a causal LM with a transformer stack"
        )
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def sequence_classification_class(lm: PreTrainedModel) -> type[PreTrainedModel]:
    """The ``<Arch>ForSequenceClassification`` class of ``lm``'s architecture."""
    auto_classes = getattr(type(lm), "auto_classes", None)
    classes = auto_classes() if auto_classes is not None else {}
    if "AutoModelForSequenceClassification" not in classes:
        raise ValueError(
            f"{type(lm).__name__} has no sequence-classification class; fine-tune a modformer "
            "model (gpt, mom or moduleformer)"
        )
    return classes["AutoModelForSequenceClassification"]


class SequenceClassifier(nn.Module):
    """A causal LM's transformer stack with a linear head on the last real token's final
    hidden state (GPT-1/GPT-2 style; see models/classification.py).

    ``model`` is the architecture's Hugging Face ``...ForSequenceClassification``, built
    around ``lm``'s own stack (shared, not copied: fine-tuning trains ``lm`` in place), so
    `save_classifier` saves it the HF way and ``AutoModelForSequenceClassification``
    loads it. Inputs must be right-padded (real tokens first, then padding), as
    `pad_batch` makes them; ``num_outputs`` is the number of classes, or 1 for regression.
    """

    def __init__(self, lm: PreTrainedModel, num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        base = lm.base_model
        if base is lm:
            raise ValueError(
                f"{type(lm).__name__} has no base model under base_model_prefix "
                f"{lm.base_model_prefix!r}; pass a causal LM with a transformer stack"
            )
        config = copy.deepcopy(lm.config)
        config.num_labels = num_outputs
        config.classifier_dropout = dropout
        # Built on the meta device (no memory, no init), then given lm's stack and a head.
        with torch.device("meta"):
            model = sequence_classification_class(lm)(config)
        setattr(model, model.base_model_prefix, base)
        weight = lm.get_output_embeddings().weight
        model.score = nn.Linear(
            weight.shape[1], num_outputs, device=weight.device, dtype=weight.dtype
        )
        nn.init.normal_(model.score.weight, std=0.02)
        nn.init.zeros_(model.score.bias)
        self.model = model.train(lm.training)

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> SequenceClassifier:
        """Wrap a loaded ``...ForSequenceClassification`` (see `load_classifier`)."""
        classifier = cls.__new__(cls)
        nn.Module.__init__(classifier)
        classifier.model = model
        return classifier

    @property
    def head(self) -> nn.Linear:
        return self.model.score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, num_outputs) logits (or the regression value in column 0)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass
class ClassificationTask:
    """Which columns hold the text(s) and the label, and the label set.

    ``text_columns``: one column (single sentence) or two (sentence pairs, joined by the
    eos token). ``labels``: the class names in index order; None for regression.
    """

    text_columns: tuple[str, ...]
    label_column: str
    regression: bool = False
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        self.text_columns = tuple(self.text_columns)
        if len(self.text_columns) not in (1, 2):
            raise ValueError(
                f"give one text column (single sentences) or two (sentence pairs), got "
                f"{list(self.text_columns)}"
            )

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression else len(self.labels or [])

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.text_columns, self.label_column)


def _label_key(value: Any) -> str:
    # CSV gives "1", JSON gives 1: both name the same class.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def label_set(values: Sequence[Any]) -> list[str]:
    """Sorted distinct labels; numerically when every label is an integer."""
    keys = sorted({_label_key(v) for v in values})
    try:
        return sorted(keys, key=int)
    except ValueError:
        return keys


def _targets(records: list[dict[str, Any]], task: ClassificationTask, path: str) -> torch.Tensor:
    values = [record[task.label_column] for record in records]
    if task.regression:
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError):
            bad = next(v for v in values if not _is_float(v))
            raise ValueError(
                f"{path}: regression label {bad!r} in column {task.label_column!r} is not a "
                "number; drop --regression for class labels"
            ) from None
    index = {name: i for i, name in enumerate(task.labels or [])}
    unknown = sorted({_label_key(v) for v in values} - index.keys())
    if unknown:
        raise ValueError(
            f"{path}: label(s) {unknown} in column {task.label_column!r} are not among the "
            f"training labels {task.labels}; evaluate with data of the same label set"
        )
    return torch.tensor([index[_label_key(v)] for v in values], dtype=torch.long)


def _is_float(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def encode_for_classification(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    text_columns: Sequence[str],
    max_length: int,
) -> list[list[int]]:
    """``a + eos`` or ``a + eos + b + eos`` per record, cut to ``max_length`` tokens by
    shortening the longer text first; the final eos is the token the head reads."""
    eos, _ = special_ids(tokenizer)
    columns = [encode_texts(tokenizer, [str(r[c]) for r in records]) for c in text_columns]
    budget = max_length - len(columns)  # room left after one eos per text
    if budget < len(columns):
        raise ValueError(
            f"max_length {max_length} leaves no room for text; use a larger max_length"
        )
    if len(columns) == 1:
        return [ids[:budget] + [eos] for ids in columns[0]]
    encoded = []
    for a, b in zip(*columns):
        keep_a, keep_b = _truncate_pair(len(a), len(b), budget)
        encoded.append(a[:keep_a] + [eos] + b[:keep_b] + [eos])
    return encoded


def _truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths to keep so that the pair fits ``budget``, shortening the longer one first
    (Hugging Face's "longest_first")."""
    if len_a + len_b <= budget:
        return len_a, len_b
    half = budget // 2
    if len_a <= half:
        return len_a, budget - len_a
    if len_b <= half:
        return budget - len_b, len_b
    return budget - half, half


@torch.no_grad()
def predict_classifier(
    classifier: SequenceClassifier,
    encoded: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, num_outputs) outputs on the CPU, in input order."""
    device = classifier.head.weight.device
    was_training = classifier.training
    classifier.eval()
    outputs = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = pad_batch(encoded[start : start + batch_size], pad_id)
        outputs.append(classifier(ids.to(device), mask.to(device)).float())
    classifier.train(was_training)
    return torch.cat(outputs).cpu()


def score_classifier(
    classifier: SequenceClassifier,
    tokenizer: PreTrainedTokenizerBase,
    task: ClassificationTask,
    path: str | Path,
    max_length: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """The task's metrics on a labelled file: accuracy / F1 / MCC, or Pearson / Spearman /
    MSE for regression."""
    records = read_records(path, task.fields)
    targets = _targets(records, task, str(path))
    encoded = encode_for_classification(tokenizer, records, task.text_columns, max_length)
    outputs = predict_classifier(classifier, encoded, special_ids(tokenizer)[1], batch_size)
    if task.regression:
        metrics = regression_metrics(targets.numpy(), outputs[:, 0].numpy())
    else:
        metrics = classification_metrics(
            targets.numpy(), outputs.argmax(dim=1).numpy(), task.num_outputs
        )
    metrics["examples"] = len(records)
    return metrics


def finetune_classifier(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_path: str | Path,
    task: ClassificationTask,
    cfg: FinetuneConfig | None = None,
    eval_path: str | Path | None = None,
    dropout: float = 0.1,
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """Fine-tune ``lm`` with a new classification (or regression) head on ``train_path``;
    score it on ``eval_path`` when given. ``task.labels`` is filled from the training file
    when None. Returns the classifier (in eval mode) and the metrics."""
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    records = read_records(train_path, task.fields)
    if not task.regression:
        if task.labels is None:
            task.labels = label_set([r[task.label_column] for r in records])
        if len(task.labels) < 2:
            raise ValueError(
                f"{train_path}: column {task.label_column!r} holds a single label "
                f"{task.labels}; classification needs at least 2 (use --regression for numbers)"
            )
    targets = _targets(records, task, str(train_path))
    max_length = resolve_max_length(lm, cfg.max_length)
    encoded = encode_for_classification(tokenizer, records, task.text_columns, max_length)
    _, pad_id = special_ids(tokenizer)

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    classifier = SequenceClassifier(lm, task.num_outputs, dropout).to(device)

    def step_loss(indices: list[int]) -> torch.Tensor:
        ids, mask = pad_batch([encoded[i] for i in indices], pad_id)
        outputs = classifier(ids.to(device), mask.to(device)).float()
        target = targets[indices].to(device)
        if task.regression:
            return F.mse_loss(outputs[:, 0], target)
        return F.cross_entropy(outputs, target)

    metrics: dict[str, Any] = {"task": "classify", "train_examples": len(records)}
    metrics.update(optimize(classifier, len(records), step_loss, cfg))
    if eval_path is not None:
        metrics["eval"] = score_classifier(
            classifier, tokenizer, task, eval_path, max_length, cfg.eval_batch_size
        )
    return classifier, metrics


def save_model_with_tokenizer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dest: str | Path,
    provenance: Provenance | None = None,
) -> Path:
    """Atomically save ``model`` with ``tokenizer`` beside it (loadable by `load_model`,
    `load_tokenizer`, `modformer generate` and lm-eval); `provenance` for its card."""
    from modformer.models.io import atomic_save_model

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        return atomic_save_model(model, dest, Path(tokenizer_dir), provenance)


def save_classifier(
    classifier: SequenceClassifier,
    task: ClassificationTask,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    provenance: Provenance | None = None,
) -> Path:
    """The fine-tuned ``...ForSequenceClassification`` (labels, ``problem_type`` in its
    config) and tokenizer in ``out_dir/model``, loadable with
    ``AutoModelForSequenceClassification`` (with or without modformer), and the task's
    columns in ``out_dir/classifier.json``."""
    from modformer.utils import atomic_write_text

    out_dir = Path(out_dir)
    config = classifier.model.config
    if task.regression:
        config.problem_type = "regression"
        config.id2label = {0: task.label_column}
    else:
        config.problem_type = "single_label_classification"
        config.id2label = dict(enumerate(task.labels or []))
    config.label2id = {name: index for index, name in config.id2label.items()}
    save_model_with_tokenizer(classifier.model, tokenizer, out_dir / "model", provenance)
    atomic_write_text(out_dir / CLASSIFIER_META_FILE, json.dumps(asdict(task), indent=2))
    return out_dir


def load_classifier(
    out_dir: str | Path, device: str = "cpu"
) -> tuple[SequenceClassifier, ClassificationTask]:
    """Inverse of `save_classifier`."""
    from transformers import AutoModelForSequenceClassification

    import modformer.models  # noqa: F401  (registers the classification classes)

    out_dir = Path(out_dir)
    meta_path = out_dir / CLASSIFIER_META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"{str(out_dir)!r} holds no {CLASSIFIER_META_FILE}; point at the --out directory "
            "of `modformer finetune --task classify --save-model`"
        )
    task = ClassificationTask(**json.loads(meta_path.read_text(encoding="utf-8")))
    config_path = out_dir / "model" / "config.json"
    architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"{str(config_path)!r} holds a {architectures or 'model'} without a classification "
            "head (saved before heads were saved the Hugging Face way?); fine-tune it again "
            "with `modformer finetune --task classify --save-model`"
        )
    model = AutoModelForSequenceClassification.from_pretrained(out_dir / "model")
    return SequenceClassifier.from_model(model.to(device).eval()), task

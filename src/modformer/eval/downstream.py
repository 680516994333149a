"""Downstream fine-tuning and scoring from local files: GLUE-style sequence
classification / regression and summarisation as conditional generation.

Any modformer causal LM (GPT, MoM, ModuleFormer) works, because only the Hugging Face
interface every one of them shares is used:

- **Classification** puts a linear head on the final hidden state of the last real token
  (GPT-1/GPT-2 style: in a causal model only the last position has read the whole input).
  The hidden states come from ``model.base_model`` (the ``transformer`` stack named by
  ``base_model_prefix``), whose ``last_hidden_state`` is the final-normed state the LM head
  reads. Calling the stack directly, rather than the causal-LM forward with a hook on the
  LM head, skips the vocabulary projection, which would otherwise cost a large share of
  each step for nothing. Routing auxiliary losses are therefore not added while
  fine-tuning a classifier. The head and the stack form the architecture's Hugging Face
  ``...ForSequenceClassification`` (models/classification.py), saved with
  ``save_pretrained`` (labels in its config) and loaded with
  ``AutoModelForSequenceClassification``, with or without modformer.
- **Summarisation** fine-tunes the causal LM itself on ``document + separator + summary +
  eos`` with the loss on the summary tokens only (labels -100 elsewhere), so the model's
  own loss (with any routing auxiliary loss) is optimised; summaries are generated
  greedily with ``generate()`` and scored with ROUGE-1/2/L F-measure (``rouge-score``).

Inputs are CSV (``.csv``), TSV (``.tsv``, read GLUE style: tab-separated, no quoting) or
JSON lines (``.jsonl``; ``.json`` may also hold one JSON array of objects). Classification
labels may be strings or integers (the label set is taken from the training file, sorted,
numerically when every label is an integer, so GLUE's 0/1/2 keep their meaning); with
``regression=True`` labels are floats (STS-B) and the head has one output trained with MSE.

``modformer finetune MODEL --task classify|summarize --train FILE --eval FILE --out DIR``
runs either task from the command line (`add_finetune_arguments` / `run_finetune`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modformer.cli_args import add_finetune_arguments  # noqa: F401  (argparse lives there)
from modformer.eval.finetune_config import DEFAULT_SEPARATOR, FinetuneConfig
from modformer.models.model_card import Provenance

log = logging.getLogger("modformer.finetune")

IGNORE_INDEX = -100  # label value the causal-LM loss skips
CLASSIFIER_META_FILE = "classifier.json"


# ---------------------------------------------------------------------------------------
# Metrics (plain numpy, conventions of scikit-learn)
# ---------------------------------------------------------------------------------------


def _as_int_arrays(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true has {y_true.size} labels but y_pred has {y_pred.size}; they must match"
        )
    if y_true.size == 0:
        raise ValueError("no labels to score")
    return y_true, y_pred


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None
) -> np.ndarray:
    """``C[i, j]`` = how many examples of true class i were predicted as class j."""
    y_true, y_pred = _as_int_arrays(y_true, y_pred)
    if num_classes is None:
        num_classes = int(max(y_true.max(), y_pred.max())) + 1
    if y_true.min() < 0 or y_pred.min() < 0 or max(y_true.max(), y_pred.max()) >= num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = _as_int_arrays(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    # A class never true and never predicted has F1 0/0; scikit-learn scores it 0.
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def f1_binary(y_true: Sequence[int], y_pred: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class (GLUE's F1 for MRPC and QQP: positive = 1)."""
    y_true, y_pred = _as_int_arrays(y_true, y_pred)
    return float(_f1_per_class(confusion_matrix(y_true == positive, y_pred == positive, 2))[1])


def f1_macro(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in ``y_true`` or
    ``y_pred`` (scikit-learn's ``average="macro"``)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(_f1_per_class(cm)[present].mean())


def matthews_corrcoef(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None
) -> float:
    """Matthews correlation (Gorodkin's multi-class R_K; the usual MCC for 2 classes).
    0 when undefined (all true or all predicted labels the same), as in scikit-learn."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    total = cm.sum()
    correct = np.trace(cm)
    true_counts = cm.sum(axis=1)
    pred_counts = cm.sum(axis=0)
    numerator = correct * total - pred_counts @ true_counts
    denominator = math.sqrt(
        (total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts)
    )
    return float(numerator / denominator) if denominator > 0 else 0.0


def _as_float_arrays(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"the two sequences have {x.size} and {y.size} values; they must match")
    if x.size < 2:
        raise ValueError("a correlation needs at least 2 values")
    return x, y


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (it is undefined there)."""
    x, y = _as_float_arrays(x, y)
    x = x - x.mean()
    y = y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denominator) if denominator > 0 else float("nan")


def rank_average_ties(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (as scipy's rankdata)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(1, x.size + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks."""
    x, y = _as_float_arrays(x, y)
    return pearson(rank_average_ties(x), rank_average_ties(y))


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int
) -> dict[str, float]:
    """accuracy, macro F1 and MCC; for 2 classes also the F1 of class 1 (``f1``)."""
    metrics = {
        "accuracy": accuracy(y_true, y_pred),
        "f1_macro": f1_macro(y_true, y_pred, num_classes),
        "mcc": matthews_corrcoef(y_true, y_pred, num_classes),
    }
    if num_classes == 2:
        metrics["f1"] = f1_binary(y_true, y_pred, positive=1)
    return metrics


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    y_true, y_pred = _as_float_arrays(y_true, y_pred)
    return {
        "pearson": pearson(y_true, y_pred),
        "spearman": spearman(y_true, y_pred),
        "mse": float(np.mean((y_true - y_pred) ** 2)),
    }


# ---------------------------------------------------------------------------------------
# Reading local data files
# ---------------------------------------------------------------------------------------

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}


def read_records(path: str | Path, required_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a CSV / TSV / JSON-lines file as dicts, checked to hold every field in
    ``required_fields`` with a non-empty value."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{str(path)!r}: unknown file type {path.suffix!r}; use one of "
            f"{', '.join(FILE_FORMATS)} (CSV with a header row, TSV GLUE-style, JSON lines)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({error})") from None
    if kind in ("csv", "tsv"):
        records = _read_delimited(text, path, kind)
    else:
        records = _read_json_records(text, path)
    if not records:
        raise ValueError(f"{str(path)!r} holds no records")
    _check_fields(records, required_fields, path)
    return records


def _read_delimited(text: str, path: Path, kind: str) -> list[dict[str, Any]]:
    # GLUE's TSV files contain unbalanced quote characters inside sentences: read them
    # without quoting, as GLUE's own readers do.
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
    # keepends: a quoted CSV field may span lines
    reader = csv.DictReader(text.splitlines(keepends=True), **options)
    records = []
    for row in reader:
        if None in row or None in row.values():
            raise ValueError(
                f"{str(path)!r} line {reader.line_num}: the number of fields differs from "
                f"the header's {len(reader.fieldnames or [])}; fix the row (a TSV file must "
                "be tab-separated, a CSV field holding commas must be quoted)"
            )
        records.append(row)
    return records


def _read_json_records(text: str, path: Path) -> list[dict[str, Any]]:
    stripped = text.lstrip()
    try:
        if path.suffix.lower() == ".json" and stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(path)!r} is not valid JSON lines ({error}); write one JSON object per line"
        ) from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(
                f"{str(path)!r} record {number} is a {type(record).__name__}, not a JSON object"
            )
    return records


def _check_fields(records: list[dict[str, Any]], fields: Sequence[str], path: Path) -> None:
    available = list(records[0])
    missing = [name for name in fields if name not in available]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no column(s) {missing}; its columns are {available}. "
            "Name the right ones with the text/label/document/summary column options"
        )
    for number, record in enumerate(records, 1):
        for name in fields:
            value = record.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(
                    f"{str(path)!r} record {number}: column {name!r} is missing or empty"
                )


# ---------------------------------------------------------------------------------------
# Shared pieces: tokens, batching, optimisation
# ---------------------------------------------------------------------------------------


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
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


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
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


def _optimize(
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

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (total - step) / max(total - cfg.warmup_steps, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
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


# ---------------------------------------------------------------------------------------
# Sequence classification / regression
# ---------------------------------------------------------------------------------------


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
    eos, _ = _special_ids(tokenizer)
    columns = [_encode(tokenizer, [str(r[c]) for r in records]) for c in text_columns]
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
    outputs = predict_classifier(classifier, encoded, _special_ids(tokenizer)[1], batch_size)
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
    _, pad_id = _special_ids(tokenizer)

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
    metrics.update(_optimize(classifier, len(records), step_loss, cfg))
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
    from modformer.train.checkpoint import atomic_save_model

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


# ---------------------------------------------------------------------------------------
# Summarisation as conditional generation
# ---------------------------------------------------------------------------------------


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
    return _encode(tokenizer, [task.separator])[0]


def encode_for_summarization(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    task: SummarizationTask,
    max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record: ``document + separator + summary + eos``, labels
    -100 on the document and separator so only the summary is learned. The summary is
    cut to ``max_summary_tokens``, then the document's end is cut to fit ``max_length``."""
    eos, _ = _special_ids(tokenizer)
    separator = _separator_ids(tokenizer, task)
    documents = _encode(tokenizer, [str(r[task.document_column]) for r in records])
    summaries = _encode(tokenizer, [str(r[task.summary_column]) for r in records])
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
    documents = _encode(tokenizer, [str(r[task.document_column]) for r in records])
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
    eos, pad = _special_ids(tokenizer)
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
    _, pad_id = _special_ids(tokenizer)
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
    metrics.update(_optimize(model, len(records), step_loss, cfg))
    predictions = None
    if eval_path is not None:
        metrics["eval"], predictions = score_summarizer(
            model, tokenizer, task, eval_path, max_length, cfg.eval_batch_size
        )
    return metrics, predictions


# ---------------------------------------------------------------------------------------
# Command line: `modformer finetune`
# ---------------------------------------------------------------------------------------


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and score as `add_finetune_arguments` describes; writes
    ``--out/metrics.json`` (atomically) and returns the metrics."""
    from modformer.models.loading import load_model, load_tokenizer, resolve_model_dir
    from modformer.utils import atomic_write_text

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(
            f"{str(model_dir)!r} has no tokenizer.json; fine-tuning reads text, so save the "
            "model with its tokenizer (as `modformer train` does)"
        )
    cfg = FinetuneConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        max_length=args.max_length,
        eval_batch_size=args.eval_batch_size,
        seed=args.seed,
        device=args.device,
        log_interval=args.log_interval,
    )
    cfg.validate()
    out_dir = Path(args.out)
    model = load_model(model_dir, args.device)

    def provenance(metrics: dict[str, Any]) -> Provenance:
        steps = metrics.get("train_steps")
        return Provenance("finetune", source=str(model_dir), data=str(args.train), steps=steps)

    if args.task == "classify":
        task = ClassificationTask(
            text_columns=tuple(c.strip() for c in args.text_columns.split(",")),
            label_column=args.label_column,
            regression=args.regression,
            labels=[s.strip() for s in args.labels.split(",")] if args.labels else None,
        )
        classifier, metrics = finetune_classifier(
            model, tokenizer, args.train, task, cfg, args.eval, args.dropout
        )
        if args.save_model:
            save_classifier(classifier, task, tokenizer, out_dir, provenance(metrics))
        metrics["labels"] = task.labels
    else:
        task = SummarizationTask(
            document_column=args.document_column,
            summary_column=args.summary_column,
            separator=args.separator,
            max_summary_tokens=args.max_summary_tokens,
        )
        metrics, predictions = finetune_summarizer(
            model, tokenizer, args.train, task, cfg, args.eval
        )
        if args.save_model:
            save_model_with_tokenizer(model, tokenizer, out_dir / "model", provenance(metrics))
        if args.predictions and predictions is not None:
            atomic_write_text(
                out_dir / "predictions.jsonl",
                "".join(json.dumps({"summary": p}) + "\n" for p in predictions),
            )
    metrics.update({"model": str(model_dir), "train_file": str(args.train), "config": asdict(cfg)})
    if args.eval:
        metrics["eval_file"] = str(args.eval)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    _print_metrics(metrics)
    return metrics


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(
        f"trained {metrics['train_steps']} steps: loss {metrics['train_loss_first']:.4f} -> "
        f"{metrics['train_loss_last']:.4f}"
    )
    for name, value in metrics.get("eval", {}).items():
        print(
            f"eval {name:<10} {value:.4f}" if isinstance(value, float) else f"eval {name} {value}"
        )

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
runs either task from the command line (`modformer.commands.finetune`).

Modules: `metrics` (scikit-learn / scipy scores), `records` (file readers), `training`
(tokens, batches, the AdamW loop), `classification`, `summarization`.
"""

from modformer.eval.downstream.classification import (
    CLASSIFIER_META_FILE,
    ClassificationTask,
    SequenceClassifier,
    _truncate_pair,
    encode_for_classification,
    finetune_classifier,
    label_set,
    last_hidden_states,
    load_classifier,
    predict_classifier,
    save_classifier,
    save_model_with_tokenizer,
    score_classifier,
    sequence_classification_class,
)
from modformer.eval.downstream.metrics import (
    accuracy,
    classification_metrics,
    f1_binary,
    f1_macro,
    matthews_corrcoef,
    pearson,
    regression_metrics,
    spearman,
)
from modformer.eval.downstream.records import read_records
from modformer.eval.downstream.summarization import (
    SummarizationTask,
    encode_for_summarization,
    finetune_summarizer,
    generate_summaries,
    greedy_continuations,
    rouge_scores,
    score_summarizer,
    summarization_prompts,
)
from modformer.eval.downstream.training import IGNORE_INDEX, pad_batch, resolve_max_length
from modformer.eval.finetune_config import FinetuneConfig

__all__ = [
    "CLASSIFIER_META_FILE",
    "IGNORE_INDEX",
    "ClassificationTask",
    "FinetuneConfig",
    "SequenceClassifier",
    "SummarizationTask",
    "_truncate_pair",
    "accuracy",
    "classification_metrics",
    "encode_for_classification",
    "encode_for_summarization",
    "f1_binary",
    "f1_macro",
    "finetune_classifier",
    "finetune_summarizer",
    "generate_summaries",
    "greedy_continuations",
    "label_set",
    "last_hidden_states",
    "load_classifier",
    "matthews_corrcoef",
    "pad_batch",
    "pearson",
    "predict_classifier",
    "read_records",
    "regression_metrics",
    "resolve_max_length",
    "rouge_scores",
    "save_classifier",
    "save_model_with_tokenizer",
    "score_classifier",
    "score_summarizer",
    "sequence_classification_class",
    "spearman",
    "summarization_prompts",
]

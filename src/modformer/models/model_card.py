"""The model card (``README.md``) written beside every model the project saves.

`atomic_save_model` writes it from the model itself (architecture, total and active
parameters, FLOPs per token as `modformer cost` counts them) and from what the caller
knows of how the model was made (`Provenance`). A field nobody knows is left out, never
guessed. The command is the ``modformer`` command line when the save happens inside
`modformer.cli.main` (`modformer.invocation`), unless the caller gives one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from modformer.invocation import running_command

log = logging.getLogger("modformer.model_card")

CARD_FILE = "README.md"
METHODS = ("train", "convert", "prune", "extend", "finetune")
FLOPS_TOKENS = 128  # sequence length of the forward the FLOPs are counted on
FLOPS_SEED = 0
_SUMMARY_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "chunks",
    "mom",
    "n_att_experts",
    "k_att",
    "n_ffd_experts",
    "k_ffd",
)


@dataclass
class Provenance:
    """How a model was made, as far as the caller knows (None: unknown, left out).

    method: one of `METHODS`; command: the command that made it (default: the running
    ``modformer`` command, if any); source: the model or checkpoint it was made from;
    data: the training data; steps: optimizer steps; tokens: training tokens;
    val_loss: the final validation loss (mean next-token cross-entropy, nats).
    """

    method: str | None = None
    command: str | None = None
    source: str | None = None
    data: str | None = None
    steps: int | None = None
    tokens: int | None = None
    val_loss: float | None = None

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"provenance method {self.method!r} is unknown; use one of {METHODS}")


def _auto_class_name(model: PreTrainedModel) -> str | None:
    auto_classes = getattr(type(model), "auto_classes", None)
    if auto_classes is None:
        return None
    return next((name for name, cls in auto_classes().items() if cls is type(model)), None)


def _costs(model: PreTrainedModel) -> tuple[int, float | None, float | None, int]:
    """(total parameters, active parameters, FLOPs per token, tokens counted on): the
    model's own `count_flops` (models/flops.py, what `modformer cost` reports) on one
    forward of seeded random ids, in eval mode without gradients."""
    total = model.num_parameters()
    if not callable(getattr(model, "count_flops", None)):
        return total, None, None, 0
    seq_len = min(FLOPS_TOKENS, getattr(model.config, "n_positions", FLOPS_TOKENS))
    generator = torch.Generator().manual_seed(FLOPS_SEED)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
    ids = ids.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            report = model.count_flops(ids, None, torch.ones_like(ids, dtype=torch.bool), "causal")
    except (RuntimeError, ValueError) as error:
        # The card must never cost the model it describes: say why the figures are missing.
        log.warning("model card: no FLOPs / active parameters (counting failed: %s)", error)
        return total, None, None, 0
    finally:
        model.train(was_training)
    return total, report.active_parameters, report.per_token, seq_len


def _count(n: float) -> str:
    return f"{round(n):,}"


def model_card(model: PreTrainedModel, path: str | Path, provenance: Provenance | None) -> str:
    """The card's Markdown for `model` saved at `path`."""
    provenance = provenance or Provenance()
    config = model.config
    name = Path(path).name
    auto_class = _auto_class_name(model) or "AutoModel"
    total, active, flops, seq_len = _costs(model)
    fields = config.to_dict()
    summary = ", ".join(f"{k}={fields[k]}" for k in _SUMMARY_KEYS if fields.get(k) is not None)

    lines = [
        "---",
        "library_name: transformers",
        f"tags: [modformer, {config.model_type}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A `{type(model).__name__}` (model_type `{config.model_type}`) saved by modformer.",
        "",
        "## Architecture",
        "",
        f"- {summary}" if summary else "- see config.json",
        f"- total parameters: {_count(total)}",
    ]
    if auto_class == "AutoModelForSequenceClassification":
        labels = ", ".join(str(config.id2label[i]) for i in sorted(config.id2label))
        kind = f" ({config.problem_type})" if config.problem_type else ""
        lines.append(f"- sequence-classification head{kind}: {config.num_labels} outputs: {labels}")
    if active is not None:
        lines.append(
            f"- active parameters per token: {_count(active)} (average over the tokens of "
            "the forward below)"
        )
    if flops is not None:
        lines.append(
            f"- inference FLOPs per token: {_count(flops)} (as `modformer cost` counts: matmuls, "
            f"causal attention, one forward of {seq_len} random token ids, seed "
            f"{FLOPS_SEED}; routed models count the modules their routers picked)"
        )
    made = []
    if provenance.method is not None:
        made.append(f"- made by: {provenance.method}")
    command = provenance.command or running_command()
    if command is not None:
        made.append(f"- command: `{command}`")
    if provenance.source is not None:
        made.append(f"- from: `{provenance.source}`")
    if provenance.data is not None:
        made.append(f"- training data: `{provenance.data}`")
    if provenance.steps is not None:
        made.append(f"- training steps: {provenance.steps:,}")
    if provenance.tokens is not None:
        made.append(f"- training tokens: {provenance.tokens:,}")
    if provenance.val_loss is not None:
        made.append(f"- final validation loss: {provenance.val_loss:.4f}")
    if made:
        lines += ["", "## How it was made", "", *made]
    quoted = json.dumps(str(path))
    lines += [
        "",
        "## Load it",
        "",
        "With modformer installed (its own classes are used):",
        "",
        "```python",
        "import modformer  # registers the architectures",
        f"from transformers import {auto_class}",
        "",
        f"model = {auto_class}.from_pretrained({quoted})",
        "```",
        "",
        "Without modformer (the model's code is in this directory):",
        "",
        "```python",
        f"from transformers import {auto_class}",
        "",
        f"model = {auto_class}.from_pretrained({quoted}, trust_remote_code=True)",
        "```",
        "",
        "The full configuration is in config.json.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    model: PreTrainedModel,
    directory: str | Path,
    provenance: Provenance | None = None,
    path: str | Path | None = None,
) -> Path:
    """Write `model_card` into `directory` (`path`: where the model will live, for the
    load commands; default `directory`)."""
    card = Path(directory) / CARD_FILE
    card.write_text(model_card(model, path or directory, provenance), encoding="utf-8")
    return card

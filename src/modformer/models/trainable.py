"""Trainable scopes: which parameters a model trains, as its config says.

A model whose config has ``trainable_scope`` (ModuleFormer after expert insertion,
ModuleFormer paper sec. 4.3) trains only part of itself. The scope is stored in the config,
so a saved model keeps it, and the trainer re-applies it after loading. Inserted experts
and the rows A' of their routers are separate parameters named ``*_inserted`` /
``inserted_expert_embedding``, which is what the scope selects.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

SCOPE_INSERTED = "inserted_experts"
SCOPE_INSERTED_AND_EMBEDDINGS = "inserted_experts+embeddings"
TRAINABLE_SCOPES = (SCOPE_INSERTED, SCOPE_INSERTED_AND_EMBEDDINGS)


class TrainableScopeError(ValueError):
    """A trainable scope that cannot be applied; the message says why and the fix."""


def is_inserted_parameter(name: str) -> bool:
    """Whether parameter `name` (as in `named_parameters`) belongs to an inserted expert
    or to the rows A' of its router."""
    parts = name.split(".")
    return parts[-1].endswith("_inserted") or "inserted_expert_embedding" in parts


def count_parameters(model: PreTrainedModel, trainable_only: bool = False) -> int:
    """Parameters counted once each (a tied LM head counts once)."""
    return model.num_parameters(only_trainable=trainable_only)


def apply_trainable_scope(model: nn.Module) -> dict[str, int]:
    """Set ``requires_grad`` from ``model.config.trainable_scope``; returns the trainable
    and frozen parameter counts. Models without a scope are left as they are.

    "inserted_experts": only the inserted experts and A' train. "+embeddings": the token
    embedding too, and the LM head (tied to the embedding, or its own matrix when untied).
    """
    scope = getattr(getattr(model, "config", None), "trainable_scope", None)
    if scope is not None:
        if scope not in TRAINABLE_SCOPES:
            raise TrainableScopeError(
                f"trainable_scope {scope!r} is unknown; choose one of {list(TRAINABLE_SCOPES)} "
                "or None (train everything)"
            )
        embeddings = {id(model.get_input_embeddings().weight)}
        head = model.get_output_embeddings()
        if head is not None:
            embeddings.add(id(head.weight))  # the same tensor when tied
        trainable_embedding = scope == SCOPE_INSERTED_AND_EMBEDDINGS
        found = False
        for name, param in model.named_parameters():
            inserted = is_inserted_parameter(name)
            found |= inserted
            param.requires_grad_(inserted or (trainable_embedding and id(param) in embeddings))
        if not found:
            raise TrainableScopeError(
                f"trainable_scope={scope!r} but the model has no inserted experts, so nothing "
                "would train; insert experts with `modformer extend` or set trainable_scope "
                "to None"
            )
    trainable = count_parameters(model, trainable_only=True)
    return {"trainable": trainable, "frozen": count_parameters(model) - trainable}

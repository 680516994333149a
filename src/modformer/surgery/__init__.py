"""Module surgery: pruning experts/modules by usage (`prune`), inserting experts for
continual learning (`extend`), and the catastrophic-forgetting experiment (`forgetting`,
imported on its own: it pulls in the trainer)."""

from modformer.surgery.extend import (
    SurgeryError,
    apply_trainable_scope,
    extend_model,
    merge_inserted_experts,
)
from modformer.surgery.prune import finetune_then_prune, prune_model, prune_then_finetune

__all__ = [
    "SurgeryError",
    "apply_trainable_scope",
    "extend_model",
    "finetune_then_prune",
    "merge_inserted_experts",
    "prune_model",
    "prune_then_finetune",
]

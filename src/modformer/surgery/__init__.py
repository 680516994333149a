"""Module surgery: pruning experts/modules by usage (`prune`) and inserting experts for
continual learning (`extend`; the forgetting experiment that uses it is in
`modformer.experiments.forgetting`). Names are imported on first use (see
modformer._lazy)."""

from typing import TYPE_CHECKING

from modformer._lazy import lazy_exports

_EXPORTS = {
    "SurgeryError": "modformer.surgery.extend",
    "apply_trainable_scope": "modformer.surgery.extend",
    "extend_model": "modformer.surgery.extend",
    "merge_inserted_experts": "modformer.surgery.extend",
    "finetune_then_prune": "modformer.surgery.prune",
    "prune_model": "modformer.surgery.prune",
    "prune_then_finetune": "modformer.surgery.prune",
}
__all__ = [
    "SurgeryError",
    "apply_trainable_scope",
    "extend_model",
    "finetune_then_prune",
    "merge_inserted_experts",
    "prune_model",
    "prune_then_finetune",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from modformer.surgery.extend import (
        SurgeryError,
        apply_trainable_scope,
        extend_model,
        merge_inserted_experts,
    )
    from modformer.surgery.prune import finetune_then_prune, prune_model, prune_then_finetune

"""Module surgery: pruning experts/modules by usage (`prune`), dropping whole layers
(`layer_drop`, the pruning baseline) and inserting experts for continual learning
(`extend`). The forgetting experiment (`modformer.experiments.forgetting`) and the
prune-and-fine-tune workflows (`modformer.experiments.prune_workflows`) are experiment
drivers. Names are imported on first use (see
modformer._lazy)."""

from typing import TYPE_CHECKING

from modformer._lazy import lazy_exports

_EXPORTS = {
    "SurgeryError": "modformer.surgery.extend",
    "apply_trainable_scope": "modformer.surgery.extend",
    "extend_model": "modformer.surgery.extend",
    "merge_inserted_experts": "modformer.surgery.extend",
    "drop_layers": "modformer.surgery.layer_drop",
    "prune_model": "modformer.surgery.prune",
}
__all__ = [
    "SurgeryError",
    "apply_trainable_scope",
    "drop_layers",
    "extend_model",
    "merge_inserted_experts",
    "prune_model",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from modformer.surgery.extend import (
        SurgeryError,
        apply_trainable_scope,
        extend_model,
        merge_inserted_experts,
    )
    from modformer.surgery.layer_drop import drop_layers
    from modformer.surgery.prune import prune_model

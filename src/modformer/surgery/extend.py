"""Expert insertion for continual learning (ModuleFormer sec. 4.3, design §3), and the
helpers the other surgery modules share.

`extend_model` adds ``N_new`` freshly initialised experts to every layer (attention and/or
FFN) and extends each router's expert embedding ``A`` with rows ``A'`` (eq. 9). The new
experts and ``A'`` are the model's "inserted" parameters: separate tensors
(``w_in_inserted``, ``router.inserted_expert_embedding``, ...) that the forward pass
concatenates after the original ones. The original experts, ``A``, ``B``, the shared
keys/values, the norms and the LM head are frozen; the token embedding (tied to the LM
head) optionally trains (``train_embeddings``, the paper's joint setting keeps it
trainable). Training adds the routing regulariser ``routing_reg_weight * ||A'||^2``
(eq. 10) to the loss. The load-balancing loss is switched off by default: with only A'
trainable it would push every token, old-domain ones included, towards the new experts,
against the regulariser; the paper's partially trainable router ("Partial", Table 9)
trains without it.

Why separate tensors. Experts are stacked as (N, d_in, d_out) tensors, and freezing a
slice of one tensor cannot be left to the optimizer: a gradient mask keeps AdamW's moments
at zero but its decoupled weight decay still shrinks the frozen rows. With the inserted
experts in parameters of their own, freezing is ``requires_grad=False`` on whole
parameters, which `modformer train` leaves out of the optimizer, so the frozen weights stay
bit-identical however long training runs.

The freezing is recorded in the config as ``trainable_scope`` ("inserted_experts", or
"inserted_experts+embeddings"), so a saved extended model can be trained further:
`apply_trainable_scope` (called by the trainer after loading) sets ``requires_grad`` from
it. `merge_inserted_experts` turns an extended model back into a plain one (the inserted
experts become ordinary experts, everything trainable).

Initialisation (the paper says only "randomly initialized"; the official code has no
insertion): new expert weights are drawn as at pretraining (N(0, initializer_range), the
output projections scaled by 1/sqrt(2 n_layer)); the rows of ``A'`` are N(0, s) with
``s = router_init_std`` (default initializer_range, the distribution ``A`` started from).
Zero-mean rows give the new experts logits near 0 at first, neither favoured nor excluded;
``router_init_std=0`` starts them at exactly 0.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from modformer.models.routed import ATTN, FFN, RoutedModel
from modformer.models.trainable import (  # noqa: F401  (re-exported: the surgery API)
    SCOPE_INSERTED,
    SCOPE_INSERTED_AND_EMBEDDINGS,
    TRAINABLE_SCOPES,
    apply_trainable_scope,
    count_parameters,
    is_inserted_parameter,
)


class SurgeryError(ValueError):
    """A surgery request that cannot be carried out; the message says why and the fix."""


# ---- shared helpers --------------------------------------------------------------------


def require_insertion(model: nn.Module, what: str) -> RoutedModel:
    """`model` when its pools can take inserted experts (`RoutedModel.supports_insertion`)."""
    if isinstance(model, RoutedModel) and model.supports_insertion:
        return model
    raise SurgeryError(
        f"{what} needs a ModuleFormer model (arch 'moduleformer'), got a "
        f"{type(model).__name__}; expert insertion follows ModuleFormer sec. 4.3, whose "
        "routers have one expert embedding row per expert"
    )


def load_model_dir(path: str | Path) -> PreTrainedModel:
    """A saved model (directory or training out_dir) on the CPU, for surgery."""
    from modformer.models.loading import load_model

    return load_model(path, "cpu")


def save_model_with_tokenizer(
    model: PreTrainedModel,
    out_dir: str | Path,
    source_dir: str | Path | None,
    method: str | None = None,
) -> Path:
    """Save `model` atomically to `out_dir`, with the tokenizer of `source_dir` (a model
    directory or training out_dir) beside it when it has one; the model card says it
    was made by `method` ("prune", "extend") from `source_dir`."""
    from modformer.models.io import atomic_save_model
    from modformer.models.loading import load_tokenizer
    from modformer.models.model_card import Provenance

    source = None if source_dir is None else str(source_dir)
    provenance = Provenance(method=method, source=source)
    tokenizer = load_tokenizer(source_dir) if source_dir is not None else None
    if tokenizer is None:
        return atomic_save_model(model, out_dir, provenance=provenance)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)
        return atomic_save_model(model, out_dir, Path(tokenizer_dir), provenance)


def rebuild(model: PreTrainedModel, config: Any, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A model of `model`'s class built from `config`, holding `state` (strictly), on
    `model`'s device and dtype and in its train/eval mode."""
    param = next(model.parameters())
    new_model = type(model)(config)
    new_model.load_state_dict(state, strict=True)
    new_model.to(device=param.device, dtype=param.dtype)
    return new_model.train(model.training)


def _config_dict(config: Any) -> dict[str, Any]:
    """The config's fields as constructor keyword arguments."""
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        fields.pop(key, None)
    return fields


def new_config(config: Any, **changes: Any) -> Any:
    """A copy of `config` with `changes`, validated like a freshly built one."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return type(config)(**{**_config_dict(config), **changes})
    except StrictDataclassError as error:
        cause = error.__cause__ or error
        raise SurgeryError(f"the changed model config is invalid: {cause}") from None


# ---- trainable scope -------------------------------------------------------------------


# ---- merge -----------------------------------------------------------------------------


def merge_inserted_experts(model: PreTrainedModel) -> PreTrainedModel:
    """A plain ModuleFormer equal to `model` whose inserted experts are ordinary experts
    (appended after the original ones, A' appended to A); every parameter trainable.

    The logits are unchanged: the forward pass concatenates the same tensors.
    """
    model = require_insertion(model, "merging inserted experts")
    pairs = model.inserted_parameter_pairs()
    if not pairs:
        return model
    state = dict(model.state_dict())
    for original, inserted in pairs:
        state[original] = torch.cat([state[original], state.pop(inserted)])
    merged = new_config(model.config, **model.config_merging_inserted(), trainable_scope=None)
    return rebuild(model, merged, state)


# ---- extend ----------------------------------------------------------------------------


def extend_model(
    model: PreTrainedModel,
    new_experts: int,
    *,
    attention: bool = True,
    ffn: bool = True,
    train_embeddings: bool = False,
    routing_reg_weight: float | None = None,
    aux_loss_weight: float | None = 0.0,
    router_init_std: float | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """`model` (a ModuleFormer) with `new_experts` new experts per layer, frozen but for
    the new experts and their router rows A' (see the module docstring).

    attention / ffn: where to insert (both by default). train_embeddings: also train the
    token embedding (and the tied LM head). routing_reg_weight: the weight of ``||A'||^2``
    during the following training (None keeps the model's). aux_loss_weight: the weight
    of the load-balancing loss during that training (default 0, see the module docstring;
    None keeps the model's). router_init_std: std of the A' rows (None:
    config.initializer_range; 0: zero rows). seed: seeds the new weights.

    A model that already has inserted experts is merged first, so the earlier insertion
    is frozen along with the rest. Logits change only by the new experts' share of the
    routing probabilities; the original parameters are copied exactly.
    """
    model = require_insertion(model, "expert insertion")
    if isinstance(new_experts, bool) or not isinstance(new_experts, int) or new_experts < 1:
        raise SurgeryError(f"new_experts must be a positive integer, got {new_experts!r}")
    if not (attention or ffn):
        raise SurgeryError("nothing to insert: enable attention and/or FFN experts")
    weights = {"routing_reg_weight": routing_reg_weight, "aux_loss_weight": aux_loss_weight}
    for name, weight in weights.items():
        if weight is not None and not weight >= 0:
            raise SurgeryError(f"{name} must be >= 0, got {weight}")
    if router_init_std is not None and not router_init_std >= 0:
        raise SurgeryError(f"router_init_std must be >= 0, got {router_init_std}")

    model = merge_inserted_experts(model)
    config = model.config
    new_per_kind = {ATTN: new_experts if attention else 0, FFN: new_experts if ffn else 0}
    changes: dict[str, Any] = model.config_with_new_choices(new_per_kind)
    changes["trainable_scope"] = (
        SCOPE_INSERTED_AND_EMBEDDINGS if train_embeddings else SCOPE_INSERTED
    )
    for name, weight in weights.items():
        if weight is not None:
            changes[name] = float(weight)
    extended_config = new_config(config, **changes)

    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        extended = type(model)(extended_config)  # fresh weights everywhere, ...
    # ... then the original parameters, which keep their names and shapes; only the
    # inserted parameters are new.
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(is_inserted_parameter(name) for name in missing):
        raise RuntimeError(  # a bug, not bad input: the layouts no longer agree
            f"inserting experts changed the original parameters' layout "
            f"(missing {missing}, unexpected {unexpected})"
        )
    if router_init_std is not None:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, weight in extended.named_parameters():
                if name.endswith("inserted_expert_embedding.weight"):
                    noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
                    weight.copy_(noise * router_init_std)
    extended.to(device=param.device, dtype=param.dtype).train(model.training)
    apply_trainable_scope(extended)
    return extended

"""Dropping whole layers: the layer-wise pruning baseline of ModuleFormer sec. 5.3
(Sajjad et al., 2023: drop the top layers, or drop layers uniformly over the depth).

A dense GPT or a ModuleFormer keeps `keep` of its transformer blocks (``transformer.h``,
in depth order) with their weights unchanged; the embeddings, the final LayerNorm and the
head stay. The kept blocks are renumbered 0..n-1, so the result is an ordinary, smaller
model of the same class (``n_layer`` = the kept count) that saves and loads as any other.

`layers_to_keep` names the two strategies: ``"top"`` keeps the bottom ``n`` layers
(drops the top ones), ``"uniform"`` keeps ``n`` layers spread evenly over the depth,
always including the first and the last.

`layer_drop_ratios` gives the kept-parameter ratio of every layer count, which is what
the pruning curves match: expert pruning at some threshold keeps a fraction of the
parameters, and the layer-drop point of equal parameters is interpolated between the
two layer counts around it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PreTrainedModel

from modformer.models.gpt import GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerForCausalLM
from modformer.surgery.extend import SurgeryError, new_config, rebuild

LAYER_DROP_STRATEGIES = ("top", "uniform")
_BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.*)$")


def layers_to_keep(n_layer: int, n_keep: int, strategy: str) -> list[int]:
    """The indices of the `n_keep` layers (of `n_layer`) that `strategy` keeps."""
    if strategy not in LAYER_DROP_STRATEGIES:
        raise SurgeryError(
            f"layer-drop strategy must be one of {list(LAYER_DROP_STRATEGIES)}, got {strategy!r}"
        )
    if not 1 <= n_keep <= n_layer:
        raise SurgeryError(
            f"can keep 1..{n_layer} of the model's {n_layer} layers, asked for {n_keep}"
        )
    if strategy == "top" or n_keep == n_layer:
        return list(range(n_keep))
    if n_keep == 1:
        return [0]
    # Evenly spaced over the depth, first and last included; distinct since n_keep <= n_layer.
    return [round(i * (n_layer - 1) / (n_keep - 1)) for i in range(n_keep)]


def _per_layer_fields(config: Any) -> dict[str, list]:
    """Config fields that hold one entry per layer (a pruned ModuleFormer's expert counts
    and router slots): they are sliced with the layers."""
    n_layer = config.num_hidden_layers
    return {
        key: value
        for key, value in config.to_dict().items()
        if key.endswith(("_per_layer", "_slots")) and isinstance(value, list)
        if len(value) == n_layer
    }


def drop_layers(
    model: PreTrainedModel, n_keep: int, strategy: str = "top"
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A new model with `n_keep` of `model`'s layers (chosen by `strategy`); `model` is
    untouched. Returns it and a JSON-able report (kept layers, parameters before/after)."""
    # MoM is left out: its chunks run shared module pools over several steps, so a
    # "layer" is not a self-contained block there.
    if not isinstance(model, (GPTForCausalLM, ModuleFormerForCausalLM)):
        raise SurgeryError(
            f"layer dropping works on a dense GPT or a ModuleFormer, not {type(model).__name__}"
        )
    config = model.config
    keep = layers_to_keep(config.num_hidden_layers, n_keep, strategy)
    new_index = {old: new for new, old in enumerate(keep)}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in new_index:
            state[f"transformer.h.{new_index[int(match.group(1))]}.{match.group(2)}"] = value
    changes = {k: [v[i] for i in keep] for k, v in _per_layer_fields(config).items()}
    dropped = rebuild(model, new_config(config, n_layer=n_keep, **changes), state)
    before, after = model.num_parameters(), dropped.num_parameters()
    report = {
        "strategy": strategy,
        "layers_before": config.num_hidden_layers,
        "kept_layers": keep,
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before,
    }
    return dropped, report


def layer_drop_ratios(model: PreTrainedModel) -> dict[int, float]:
    """Kept-parameter ratio of every layer count 1..n_layer (the same for both
    strategies when the layers are alike; computed, not assumed, from the layers' sizes)."""
    layers = model.transformer.h
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = model.num_parameters()
    rest = total - sum(per_layer)
    return {n: (rest + sum(per_layer[:n])) / total for n in range(1, len(per_layer) + 1)}

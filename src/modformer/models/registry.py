"""Architectures by name, so the trainer and CLI build any model from `arch` + `preset`.

Each entry maps an architecture name to (config class, causal-LM class). Config classes
provide `from_preset(name, **overrides)`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig, PreTrainedModel

from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM

ARCHITECTURES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "gpt": (GPTConfig, GPTForCausalLM),
    "mom": (MoMConfig, MoMForCausalLM),
    "moduleformer": (ModuleFormerConfig, ModuleFormerForCausalLM),
}


def build_config(arch: str, preset: str, **overrides: Any) -> PreTrainedConfig:
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"model.arch: unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    config_cls, _ = ARCHITECTURES[arch]
    # HF configs keep unknown keyword arguments as attributes: a misspelt override would
    # silently train the preset, so check the names here.
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hints = ", ".join(f"{u} (did you mean {c[0]}?)" if c else u for u, c in close.items())
        raise ValueError(f"model.overrides: unknown field(s) of {config_cls.__name__}: {hints}")
    try:
        return config_cls.from_preset(preset, **overrides)
    except StrictDataclassError as e:
        # `@strict` wraps our validators' ValueErrors; show the validator's own message.
        cause = e.__cause__ or e
        raise ValueError(f"model config: {cause}") from None
    except TypeError as e:  # an override that is not a field of this config
        raise ValueError(f"model.overrides: {e}") from None


def build_model(config: PreTrainedConfig) -> PreTrainedModel:
    for config_cls, model_cls in ARCHITECTURES.values():
        if type(config) is config_cls:
            return model_cls(config)
    raise ValueError(f"no modformer architecture uses config class {type(config).__name__}")

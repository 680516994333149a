"""Activation checkpointing (HF `activation_checkpointing_enable` / `gradient_checkpointing_enable`).

Every repeated layer (GPT `Block`, `MoMChunk`, `ModuleFormerBlock`) is a
`transformers.GradientCheckpointingLayer`: once checkpointing is enabled, a training forward
keeps only each layer's inputs and recomputes the layer in the backward pass.

Two rules keep the loss and gradients exactly those of a plain run:

- Recomputation must replay the same random draws (dropout): `preserve_rng_state` stays on.
- A layer must be a pure function of its arguments: anything it reports besides its output
  (routing decisions, auxiliary-loss terms, module loads) is *returned*, never appended to
  shared state, so the recompute in the backward pass cannot add it a second time, and any
  state carried from layer to layer is passed in and returned, not mutated in place.

Layers return Python structures (router outputs, traces) next to their tensors, which only
the non-reentrant checkpoint supports, so `use_reentrant=True` is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)

# Older transformers releases (5.4 among those we support) name the switch only
# `gradient_checkpointing_enable` and checkpoint every layer; newer ones add
# `activation_checkpointing_enable` (and deprecate the old name) with `every_n_layers`.
_HF_HAS_ACTIVATION_CHECKPOINTING = hasattr(PreTrainedModel, "activation_checkpointing_enable")
_HF_SETTER_TAKES_EVERY_N = (
    "every_n_layers" in inspect.signature(PreTrainedModel._set_gradient_checkpointing).parameters
)


class CheckpointingMixin:
    """For a modformer `PreTrainedModel`: allow activation checkpointing, with the checks above.

    The stack module (`GPTModel`, `MoMModel`, `ModuleFormerModel`) sets
    `self.gradient_checkpointing = False` in its `__init__`; HF turns it on with the layers'.
    """

    supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(
        self,
        enable: bool = True,
        gradient_checkpointing_func: Callable = torch.utils.checkpoint.checkpoint,
        every_n_layers: int = 1,
    ) -> None:
        options = getattr(gradient_checkpointing_func, "keywords", {}) or {}
        if enable and options.get("use_reentrant", False):
            raise ValueError(
                "modformer layers return routing information next to their outputs, which the "
                "reentrant checkpoint cannot carry gradients through; enable checkpointing "
                "with use_reentrant=False (the default of activation_checkpointing_enable())"
            )
        if enable and options.get("preserve_rng_state", True) is False:
            raise ValueError(
                "preserve_rng_state=False would let the backward recomputation draw new dropout "
                "masks, so gradients would not match the forward; leave it at True"
            )
        if _HF_SETTER_TAKES_EVERY_N:
            super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        elif every_n_layers != 1:
            raise ValueError(
                "every_n_layers needs a newer transformers (this one checkpoints every layer)"
            )
        else:
            super()._set_gradient_checkpointing(enable, gradient_checkpointing_func)

    if not _HF_HAS_ACTIVATION_CHECKPOINTING:

        def activation_checkpointing_enable(
            self,
            activation_checkpointing_kwargs: dict | None = None,
            every_n_layers: int = 1,
            offload: bool = False,
        ) -> None:
            """The newer transformers' name, on a release that has only the older one."""
            if every_n_layers != 1 or offload:
                raise ValueError(
                    "every_n_layers and offload need a newer transformers (this one "
                    "checkpoints every layer and keeps the inputs on the device)"
                )
            kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

        def activation_checkpointing_disable(self) -> None:
            self.gradient_checkpointing_disable()


def checkpointing_active(stack: torch.nn.Module) -> bool:
    """Whether this forward of `stack` recomputes its layers in the backward pass."""
    return bool(getattr(stack, "gradient_checkpointing", False)) and (
        stack.training and torch.is_grad_enabled()
    )


def no_cache_when_checkpointing(
    stack: torch.nn.Module, use_cache: bool, cache: Cache | None
) -> tuple[bool, Cache | None]:
    """`(use_cache, cache)`, both turned off (with a warning) under checkpointing: a
    recomputed layer would write its keys and values into the cache a second time."""
    if (use_cache or cache is not None) and checkpointing_active(stack):
        logger.warning_once(
            "a KV cache is incompatible with activation checkpointing in training; "
            "running without one"
        )
        return False, None
    return use_cache, cache

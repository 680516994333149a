"""modformer: modular transformers (Mixture-of-Modules and ModuleFormer) in PyTorch.

`import modformer` is light (no torch): the `modformer` command needs the package to
build its argument parser, and `modformer --help` should not wait for torch. The public
classes below are imported on first access (PEP 562), and the architectures are
registered with transformers' Auto classes as soon as transformers is imported (or
right away when it already is), so `import modformer` followed by
`AutoModelForCausalLM.from_pretrained(dir)` works as before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from modformer._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "GPTConfig": "modformer.models.gpt",
    "GPTModel": "modformer.models.gpt",
    "GPTForCausalLM": "modformer.models.gpt",
    "MoMConfig": "modformer.models.mom",
    "MoMModel": "modformer.models.mom",
    "MoMForCausalLM": "modformer.models.mom",
    "ModuleFormerConfig": "modformer.models.moduleformer",
    "ModuleFormerModel": "modformer.models.moduleformer",
    "ModuleFormerForCausalLM": "modformer.models.moduleformer",
}

__all__ = [
    "GPTConfig",
    "GPTForCausalLM",
    "GPTModel",
    "MoMConfig",
    "MoMForCausalLM",
    "MoMModel",
    "ModuleFormerConfig",
    "ModuleFormerForCausalLM",
    "ModuleFormerModel",
    "__version__",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from modformer.models.gpt import GPTConfig, GPTForCausalLM, GPTModel
    from modformer.models.moduleformer import (
        ModuleFormerConfig,
        ModuleFormerForCausalLM,
        ModuleFormerModel,
    )
    from modformer.models.mom import MoMConfig, MoMForCausalLM, MoMModel


def _register_auto_classes() -> None:
    importlib.import_module("modformer.models")  # its __init__ does the registration


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds `transformers` like the normal finders, but registers modformer's
    architectures right after its top-level module has run (once, then it steps aside)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register_auto_classes()

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())

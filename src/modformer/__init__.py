"""modformer: modular transformers (Mixture-of-Modules and ModuleFormer) in PyTorch."""

from modformer import models  # noqa: F401  (registers the Auto classes)
from modformer.models.gpt import GPTConfig, GPTForCausalLM

__version__ = "0.1.0"
__all__ = ["GPTConfig", "GPTForCausalLM", "__version__"]

"""Model families. Importing this package registers them with the HF Auto classes: the
config with `AutoConfig`, and each model class under the Auto class its architecture
lists in `auto_classes()` (the same table `save_pretrained` writes into ``auto_map``)."""

import transformers
from transformers import AutoConfig

from modformer.models.gpt import GPTConfig, GPTForCausalLM, GPTModel, GPTPreTrainedModel
from modformer.models.moduleformer import (
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerModel,
    ModuleFormerPreTrainedModel,
)
from modformer.models.mom import MoMConfig, MoMForCausalLM, MoMModel, MoMPreTrainedModel

for _config_class, _pretrained_class in (
    (GPTConfig, GPTPreTrainedModel),
    (ModuleFormerConfig, ModuleFormerPreTrainedModel),
    (MoMConfig, MoMPreTrainedModel),
):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    for _auto_name, _model_class in _pretrained_class.auto_classes().items():
        getattr(transformers, _auto_name).register(_config_class, _model_class, exist_ok=True)

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
]

from modformer.models.moduleformer.configuration_moduleformer import (
    MODULEFORMER_PRESETS,
    ModuleFormerConfig,
)
from modformer.models.moduleformer.modeling_moduleformer import (
    ModuleFormerBlock,
    ModuleFormerCausalLMOutput,
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
    ModuleFormerMemory,
    ModuleFormerModel,
    ModuleFormerPreTrainedModel,
)

__all__ = [
    "MODULEFORMER_PRESETS",
    "ModuleFormerBlock",
    "ModuleFormerCausalLMOutput",
    "ModuleFormerConfig",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerMemory",
    "ModuleFormerModel",
    "ModuleFormerPreTrainedModel",
]

from modformer.models.gpt.configuration_gpt import GPT_PRESETS, GPTConfig
from modformer.models.gpt.modeling_gpt import (
    Block,
    GPTForCausalLM,
    GPTForSequenceClassification,
    GPTModel,
    GPTPreTrainedModel,
)

__all__ = [
    "GPT_PRESETS",
    "Block",
    "GPTConfig",
    "GPTForCausalLM",
    "GPTForSequenceClassification",
    "GPTModel",
    "GPTPreTrainedModel",
]

from modformer.models.gpt.configuration_gpt import GPT_PRESETS, GPTConfig
from modformer.models.gpt.modeling_gpt import Block, GPTForCausalLM, GPTModel, GPTPreTrainedModel

__all__ = [
    "GPT_PRESETS",
    "Block",
    "GPTConfig",
    "GPTForCausalLM",
    "GPTModel",
    "GPTPreTrainedModel",
]

from modformer.models.mom.configuration_mom import MOM_PRESETS, MoMConfig
from modformer.models.mom.modeling_mom import (
    MoMCausalLMOutput,
    MoMChunk,
    MoMForCausalLM,
    MoMForSequenceClassification,
    MoMModel,
    MoMPreTrainedModel,
    RoutingStep,
)

__all__ = [
    "MOM_PRESETS",
    "MoMCausalLMOutput",
    "MoMChunk",
    "MoMConfig",
    "MoMForCausalLM",
    "MoMForSequenceClassification",
    "MoMModel",
    "MoMPreTrainedModel",
    "RoutingStep",
]

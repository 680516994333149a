"""Model families. Importing this package registers them with the HF Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modformer.models.gpt import GPTConfig, GPTForCausalLM, GPTModel

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModel.register(GPTConfig, GPTModel, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPTForCausalLM, exist_ok=True)

from modformer.models.moduleformer import (  # noqa: E402
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerModel,
)

AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
AutoModel.register(ModuleFormerConfig, ModuleFormerModel, exist_ok=True)
AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)

from modformer.models.mom import MoMConfig, MoMForCausalLM, MoMModel  # noqa: E402

AutoConfig.register(MoMConfig.model_type, MoMConfig, exist_ok=True)
AutoModel.register(MoMConfig, MoMModel, exist_ok=True)
AutoModelForCausalLM.register(MoMConfig, MoMForCausalLM, exist_ok=True)

"""Model families. Importing this package registers them with the HF Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modformer.models.gpt import GPTConfig, GPTForCausalLM, GPTModel

AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModel.register(GPTConfig, GPTModel, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPTForCausalLM, exist_ok=True)

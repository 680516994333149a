"""Configuration of the vanilla GPT-2 model (design §1)."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from modformer.nn.activations import ACTIVATIONS

# GPT-2 shapes; `tiny` is the CPU demo scale and `d512` the benchmark's mid-size model.
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256),
    "d512": dict(n_embd=512, n_layer=8, n_head=8, n_positions=1024),
    "small": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024),
    "large": dict(n_embd=1280, n_layer=36, n_head=20, n_positions=1024),
}


def apply_preset(presets: dict[str, dict[str, Any]], preset: str, overrides: dict) -> dict:
    """Merge a named preset with explicit overrides; unknown names raise a clear error."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return {**presets[preset], **overrides}


@strict
class GPTConfig(PreTrainedConfig):
    """GPT-2 architecture: learned positions, pre-LN blocks, tanh-GELU MLP, tied LM head."""

    model_type = "modformer_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bias: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> GPTConfig:
        return cls(**apply_preset(GPT_PRESETS, preset, overrides))

    @property
    def d_inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate_architecture(self):
        """Checked by `@strict` on construction; messages name the field."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and self.n_inner <= 0:
            raise ValueError(f"n_inner must be positive or None, got {self.n_inner}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is unknown; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

"""Import a local Hugging Face GPT-2 directory (`config.json` + `model.safetensors`) into
`GPTForCausalLM` (design §1). Nothing is downloaded.

HF GPT-2 stores `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj` as Conv1D, i.e. as
(in, out) matrices: we transpose them into `nn.Linear`'s (out, in). Keys may carry the
`transformer.` prefix or not; `attn.bias` / `attn.masked_bias` are mask buffers and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GPT2Config

from modformer.convert.checkpoint_files import ConversionError, read_checkpoint_weights
from modformer.models.gpt import GPTConfig, GPTForCausalLM

CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
BUFFER_SUFFIXES = ("attn.bias", "attn.masked_bias")


def _read_config(src: Path) -> GPTConfig:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json; is it a Hugging Face GPT-2 directory?")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if hf.get("model_type") not in ("gpt2", None):
        raise ConversionError(f"{path} describes a {hf.get('model_type')!r} model, not gpt2")
    for flag in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if hf.get(flag):
            raise ConversionError(
                f"{path}: {flag}=true is not supported by the GPT-2 architecture here"
            )
    if hf.get("scale_attn_weights") is False:
        raise ConversionError(f"{path}: scale_attn_weights=false is not supported")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        n_positions=hf.get("n_positions", 1024),
        n_embd=hf.get("n_embd", 768),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_inner=hf.get("n_inner"),
        activation_function=hf.get("activation_function", "gelu_new"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
        dropout=0.0,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def gpt2_state_dict_to_modformer(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose an HF GPT-2 state dict into `GPTForCausalLM`'s layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if ".".join(key.split(".")[-2:]) in BUFFER_SUFFIXES or key == "lm_head.weight":
            continue  # mask buffers; the LM head is tied to wte
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        if name.endswith(CONV1D_SUFFIXES):
            value = value.t().contiguous()
        out[name] = value
    return out


def load_gpt2_directory(src: str | Path) -> GPTForCausalLM:
    """Build a `GPTForCausalLM` from a local HF GPT-2 directory, weights checked by shape."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(
            f"{src} is not a directory; pass a local Hugging Face GPT-2 directory"
        )
    config = _read_config(src)
    model = GPTForCausalLM(config)
    state = gpt2_state_dict_to_modformer(read_checkpoint_weights(src))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{src}: weights do not match a GPT-2 of this config; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ConversionError(
                f"{src}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def convert_gpt2(src: str | Path, dst: str | Path) -> GPTForCausalLM:
    """`modformer convert gpt2 SRC DST`: import and save, with SRC's tokenizer files."""
    from modformer.models.io import atomic_save_model
    from modformer.models.model_card import Provenance

    model = load_gpt2_directory(src)
    atomic_save_model(model, dst, Path(src), Provenance(method="convert", source=str(src)))
    return model


# ---------------------------------------------------------------- export


def modformer_state_dict_to_gpt2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `gpt2_state_dict_to_modformer`: our `GPTForCausalLM` state dict in
    HF GPT-2's layout (Conv1D weights transposed back to (in, out))."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith(CONV1D_SUFFIXES):
            value = value.t()
        out[name] = value.detach().contiguous()
    return out


def gpt2_config_from_modformer(config: GPTConfig) -> GPT2Config:
    """The `GPT2Config` of a GPT config; options GPT-2 cannot represent are errors."""

    if not config.bias:
        raise ConversionError(
            "bias=False is not representable as GPT2LMHeadModel (GPT-2 has biases in every "
            "linear layer and LayerNorm)"
        )
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.n_inner,
        activation_function=config.activation_function,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        architectures=["GPT2LMHeadModel"],
    )


def export_gpt2(model: GPTForCausalLM, dst: str | Path, tokenizer_dir: Path | None = None) -> Path:
    """Write `model` as a native GPT2LMHeadModel directory (plain transformers loads it)."""
    from modformer.convert.hf_files import write_hf_directory

    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    weights = modformer_state_dict_to_gpt2(state)
    return write_hf_directory(gpt2_config_from_modformer(model.config), weights, dst, tokenizer_dir)

"""JetMoE <-> ModuleFormer: import a local `JetMoeForCausalLM` directory, and export back.

JetMoE (transformers' ``models/jetmoe``) is ModuleFormer with JetMoE's options (see
`ModuleFormerConfig`): RMSNorm, SwiGLU FFN experts, a linear router (top-k of the
logits, softmax over the kept ones), RoPE softmax attention, a bias on every MoA/MoE
output, and keys/values shared by the attention experts (``kv_proj``, no bias). Its
attention experts have ``num_key_value_heads`` heads of ``kv_channels`` each: our
``n_head`` and ``att_hidden = kv_channels * num_key_value_heads``; the query heads of
the k selected experts attend to the shared keys repeated k times, as ours do.

Weights are renamed by one declarative table, `KEY_MAP`, used in both directions; JetMoE
stores expert weights as (experts, out, in), we store (experts, in, out), so those are
transposed. Every tensor's shape is checked against the target model, and unknown or
missing keys are errors. Config values we cannot represent are errors naming the field.

Training settings: JetMoE's load-balancing loss (on when ``output_router_logits``) is
our ``aux_loss_type="switch_pooled"`` with weight ``aux_loss_coef``; off, we import
``"none"``. Our MI and z-losses have no JetMoE counterpart: exporting them writes
``output_router_logits=false`` with a warning. Not carried over (training only):
JetMoE's ``padding_idx`` on the embedding (no gradient into the pad row).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import JetMoeConfig

from modformer.convert.checkpoint_files import ConversionError, read_checkpoint_weights
from modformer.convert.hf_files import write_hf_directory
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.nn.activations import ACTIVATIONS

logger = logging.getLogger(__name__)

# JetMoE's block norms are built without an eps argument (JetMoeRMSNorm's default);
# only the final norm reads config.rms_norm_eps.
JETMOE_BLOCK_NORM_EPS = 1e-6


def _transpose_experts(w: torch.Tensor) -> torch.Tensor:
    """(experts, a, b) -> (experts, b, a): JetMoE's (out, in) <-> our (in, out)."""
    return w.transpose(1, 2).contiguous()


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


# (JetMoE key, ModuleFormer key, transform). `{L}` is the layer index. Each transform is
# its own inverse, so the table serves import and export alike.
KEY_MAP: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = [
    ("model.embed_tokens.weight", "transformer.wte.weight", _same),
    ("model.norm.weight", "transformer.ln_f.weight", _same),
    ("lm_head.weight", "lm_head.weight", _same),  # only when untied
    ("model.layers.{L}.input_layernorm.weight", "transformer.h.{L}.ln_1.weight", _same),
    ("model.layers.{L}.post_attention_layernorm.weight", "transformer.h.{L}.ln_2.weight", _same),
    (
        "model.layers.{L}.self_attention.kv_proj.weight",
        "transformer.h.{L}.attn.kv_proj.weight",
        _same,
    ),
    (
        "model.layers.{L}.self_attention.experts.input_linear.weight",
        "transformer.h.{L}.attn.w_q",
        _transpose_experts,
    ),
    (
        "model.layers.{L}.self_attention.experts.output_linear.weight",
        "transformer.h.{L}.attn.w_o",
        _transpose_experts,
    ),
    (
        "model.layers.{L}.self_attention.experts.bias",
        "transformer.h.{L}.attn.output_bias",
        _same,
    ),
    (
        "model.layers.{L}.self_attention.experts.router.layer.weight",
        "transformer.h.{L}.attn.router.expert_embedding.weight",
        _same,
    ),
    ("model.layers.{L}.mlp.input_linear.weight", "transformer.h.{L}.mlp.w_in", _transpose_experts),
    (
        "model.layers.{L}.mlp.output_linear.weight",
        "transformer.h.{L}.mlp.w_out",
        _transpose_experts,
    ),
    ("model.layers.{L}.mlp.bias", "transformer.h.{L}.mlp.output_bias", _same),
    (
        "model.layers.{L}.mlp.router.layer.weight",
        "transformer.h.{L}.mlp.router.expert_embedding.weight",
        _same,
    ),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{L}"), r"(?P<L>\d+)") + "$")


_PATTERNS = [(_compile(entry[0]), entry) for entry in KEY_MAP]
_REVERSE_PATTERNS = [(_compile(entry[1]), entry) for entry in KEY_MAP]


def _rename(weights: dict[str, torch.Tensor], to_ours: bool, where: str) -> dict[str, torch.Tensor]:
    """Apply `KEY_MAP` (JetMoE -> ours when `to_ours`, else ours -> JetMoE)."""
    patterns = _PATTERNS if to_ours else _REVERSE_PATTERNS
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in weights.items():
        for pattern, (theirs, ours, transform) in patterns:
            match = pattern.match(key)
            if match:
                target = ours if to_ours else theirs
                if "{L}" in target:
                    target = target.replace("{L}", match["L"])
                out[target] = transform(value)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{where}: {len(unknown)} weight(s) have no place in the key map, e.g. "
            f"{unknown[:5]}; is this a JetMoeForCausalLM checkpoint of this transformers "
            f"version?"
        )
    return out


# ---------------------------------------------------------------- import


def _read_jetmoe_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json; is it a JetMoeForCausalLM directory?")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if hf.get("model_type") != "jetmoe":
        raise ConversionError(
            f"{path} describes a {hf.get('model_type')!r} model, not 'jetmoe'; "
            f"`modformer convert jetmoe` imports JetMoeForCausalLM directories"
        )
    return hf


def moduleformer_config_from_jetmoe(hf: dict, where: str = "config.json") -> ModuleFormerConfig:
    """The ModuleFormer config of a JetMoE config dict; unrepresentable values are errors."""
    # JetMoeConfig fills the defaults (and the rope_parameters) of keys the file omits.
    known = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    try:
        jet = JetMoeConfig(**known)
    except Exception as e:
        raise ConversionError(f"{where}: not a valid JetMoE config ({e})") from None
    rope = dict(jet.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(
            f"{where}: rope_parameters.rope_type={rope_type!r} is not representable; "
            f"ModuleFormer's softmax_rope attention implements the default RoPE only"
        )
    if jet.attention_dropout:
        raise ConversionError(
            f"{where}: attention_dropout={jet.attention_dropout} is not representable "
            f"(ModuleFormer has no attention dropout); set it to 0"
        )
    if jet.activation_function not in ACTIVATIONS:
        raise ConversionError(
            f"{where}: activation_function={jet.activation_function!r} is not one of ours "
            f"({sorted(ACTIVATIONS)})"
        )
    if jet.num_key_value_heads == 1 and jet.kv_channels == jet.hidden_size:
        raise ConversionError(
            f"{where}: one key/value head of width hidden_size={jet.hidden_size} is not "
            f"representable: ModuleFormer uses the identity for W_k/W_v in that case, "
            f"JetMoE a learned kv_proj"
        )
    return ModuleFormerConfig(
        vocab_size=jet.vocab_size,
        n_positions=jet.max_position_embeddings,
        n_embd=jet.hidden_size,
        n_layer=jet.num_hidden_layers,
        n_att_experts=jet.num_local_experts,
        att_hidden=jet.kv_channels * jet.num_key_value_heads,
        n_head=jet.num_key_value_heads,
        k_att=jet.num_experts_per_tok,
        n_ffd_experts=jet.num_local_experts,
        ffd_hidden=jet.intermediate_size,
        k_ffd=jet.num_experts_per_tok,
        activation_function=jet.activation_function,
        layer_norm_epsilon=JETMOE_BLOCK_NORM_EPS,
        final_norm_epsilon=jet.rms_norm_eps,
        initializer_range=jet.initializer_range,
        aux_loss_type="switch_pooled" if jet.output_router_logits else "none",
        aux_loss_weight=jet.aux_loss_coef,
        norm_type="rms",
        expert_mlp="swiglu",
        router_type="linear",
        attention_type="softmax_rope",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        moe_output_bias=True,
        bos_token_id=jet.bos_token_id,
        eos_token_id=jet.eos_token_id,
        pad_token_id=jet.pad_token_id,
        tie_word_embeddings=jet.tie_word_embeddings,
    )


def _check_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{where}: weights do not match the model of this config; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ConversionError(
                f"{where}: {key} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected[key].shape)}"
            )


def load_jetmoe_directory(src: str | Path) -> ModuleFormerForCausalLM:
    """A `ModuleFormerForCausalLM` from a local JetMoE directory, every weight checked."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory; pass a local JetMoeForCausalLM directory")
    config = moduleformer_config_from_jetmoe(_read_jetmoe_config(src), str(src / "config.json"))
    weights = read_checkpoint_weights(src)
    if config.tie_word_embeddings:
        head = weights.pop("lm_head.weight", None)
        embedding = weights.get("model.embed_tokens.weight")
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise ConversionError(
                f"{src}: tie_word_embeddings is true but lm_head.weight differs from "
                f"model.embed_tokens.weight; fix the config (set it to false)"
            )
    state = _rename(weights, to_ours=True, where=str(src))
    # Built on the meta device and given the checkpoint's tensors (assign): no second
    # copy of the weights and no random init, which matters at JetMoE-8B's size.
    with torch.device("meta"):
        model = ModuleFormerForCausalLM(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    _check_state(state, expected, str(src))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    leftover = [name for name, t in model.state_dict().items() if t.is_meta]
    if leftover:  # a bug of ours, not of the checkpoint: every weight was checked above
        raise ConversionError(f"{src}: weights left unset after loading: {leftover[:5]}")
    return model.to(state["transformer.wte.weight"].dtype).eval()


def convert_jetmoe(src: str | Path, dst: str | Path) -> ModuleFormerForCausalLM:
    """`modformer convert jetmoe SRC DST`: import and save, with SRC's tokenizer files."""
    from modformer.models.io import atomic_save_model
    from modformer.models.model_card import Provenance

    model = load_jetmoe_directory(src)
    atomic_save_model(model, dst, Path(src), Provenance(method="convert", source=str(src)))
    return model


# ---------------------------------------------------------------- export


def _jetmoe_mismatches(config: ModuleFormerConfig) -> list[str]:
    """The options of `config` that JetMoE cannot represent, each with the needed value."""
    required = dict(
        norm_type="rms",
        expert_mlp="swiglu",
        router_type="linear",
        attention_type="softmax_rope",
        moe_output_bias=True,
        kv_bias=False,
        layer_norm_epsilon=JETMOE_BLOCK_NORM_EPS,
        n_inserted_att_experts=0,
        n_inserted_ffd_experts=0,
        att_experts_per_layer=None,
        ffd_experts_per_layer=None,
    )
    problems = [
        f"{name}={getattr(config, name)!r} (JetMoE needs {value!r})"
        for name, value in required.items()
        if getattr(config, name) != value
    ]
    if config.n_att_experts != config.n_ffd_experts:
        problems.append(
            f"n_att_experts={config.n_att_experts} != n_ffd_experts={config.n_ffd_experts} "
            f"(JetMoE has one num_local_experts)"
        )
    if config.k_att != config.k_ffd:
        problems.append(
            f"k_att={config.k_att} != k_ffd={config.k_ffd} (JetMoE has one num_experts_per_tok)"
        )
    if config.att_hidden == config.n_embd and config.n_head == 1:
        problems.append(
            "att_hidden == n_embd with n_head=1 (our W_k/W_v are the identity there, "
            "JetMoE always has a kv_proj)"
        )
    return problems


def jetmoe_config_from_moduleformer(config: ModuleFormerConfig) -> JetMoeConfig:
    """The `JetMoeConfig` of a JetMoE-compatible ModuleFormer config (else an error)."""
    problems = _jetmoe_mismatches(config)
    if problems:
        raise ConversionError(
            "this ModuleFormer cannot be written as JetMoeForCausalLM: " + "; ".join(problems)
        )
    balance = config.aux_loss_type == "switch_pooled"
    if config.aux_loss_type not in ("switch_pooled", "none"):
        logger.warning(
            "aux_loss_type=%r has no JetMoE equivalent (JetMoE's is 'switch_pooled'); the "
            "export writes output_router_logits=false (a training setting only)",
            config.aux_loss_type,
        )
    return JetMoeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_key_value_heads=config.n_head,
        kv_channels=config.att_head_dim,
        intermediate_size=config.ffd_hidden,
        max_position_embeddings=config.n_positions,
        activation_function=config.activation_function,
        num_local_experts=config.n_att_experts,
        num_experts_per_tok=config.k_att,
        output_router_logits=balance,
        aux_loss_coef=config.aux_loss_weight,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rms_norm_eps=config.final_norm_epsilon or config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        attention_dropout=0.0,
    )


def jetmoe_state_dict(model: ModuleFormerForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under JetMoE's names and layouts (the tied head left out)."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    renamed = _rename(state, to_ours=False, where=type(model).__name__)
    return {k: v.detach().contiguous() for k, v in renamed.items()}


def export_jetmoe(
    model: ModuleFormerForCausalLM, dst: str | Path, tokenizer_dir: Path | None = None
) -> Path:
    """Write `model` as a native JetMoeForCausalLM directory (plain transformers loads it)."""
    hf_config = jetmoe_config_from_moduleformer(model.config)
    hf_config.architectures = ["JetMoeForCausalLM"]
    return write_hf_directory(hf_config, jetmoe_state_dict(model), dst, tokenizer_dir)

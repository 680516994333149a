"""Import IBM's ModuleFormer / MoLM checkpoints into `ModuleFormerForCausalLM` (SPEC §4).

The source is a local directory written by the official code (github.com/IBM/ModuleFormer,
``model_type`` "moduleformer"): ``config.json`` plus safetensors or a ``pytorch_model.bin``
(read with ``torch.load(weights_only=True)`` only). Nothing is downloaded.

How IBM's model maps onto ours (everything else is the same computation):

| IBM | modformer |
|---|---|
| router ``Linear(bias) -> GELU -> Linear`` (``gate_type`` "mlp") | ``router_activation="gelu"``, ``router_bias=True`` |
| ``k_proj``/``v_proj`` with biases (absent when K/V are the identity) | ``kv_proj`` = [k; v], ``kv_bias=True`` |
| separate ``lm_head`` | ``tie_word_embeddings=False`` (IBM's config value) |
| every LayerNorm has eps 1e-5 (its ``layer_norm_epsilon`` is unused) | ``layer_norm_epsilon=1e-5`` |
| aux loss summed over the 2 * n_layer routers, times ``aux_loss_weight`` | ours is the mean: ``aux_loss_weight`` times 2 * n_layer |
| with ``use_cache`` every call keeps all previous keys/values (unbounded) | ``use_history=True``, ``history_length=-1`` (unbounded) |
| ``block_size + history_length`` (the context IBM's attention masks are built for) | ``n_positions`` (nominal only: stick-breaking has no length limit) |
| ``bos``/``eos``/``pad_token_id`` outside the vocabulary (IBM defaults them to 50256) | None, with a warning |

IBM's aux losses also count padded tokens; ours leave them out (SPEC §3): the same on
unpadded batches.

Not representable, so refused with a message: ``gate_type`` "linear" and "gmm". Training
only, refused unless ``drop_training_options``: ``sample_topk > 0`` (sampled top-k
experts) and ``moe_pdrop > 0`` (dropout inside the router), which are then left out, and
``embd_pdrop != resid_pdrop`` (ours has one ``dropout``: it takes ``resid_pdrop``). IBM's ``attn_pdrop`` is never applied by its
code and is ignored.

The weight map is declarative (`KEY_MAP`, `CONCATENATED`, `SKIPPED`, in the style of
torchtitan's state-dict adapters): ``{}`` stands for the layer index. Every official key
must be known, every modformer weight must be produced, and every shape must match.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from modformer.convert.checkpoint_files import ConversionError, read_checkpoint_weights
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.moduleformer.configuration_moduleformer import UNBOUNDED_HISTORY
from modformer.nn.activations import ACTIVATIONS

logger = logging.getLogger(__name__)

IBM_MODEL_TYPE = "moduleformer"
IBM_LAYER_NORM_EPS = 1e-5  # IBM builds nn.LayerNorm(n_embd): torch's default eps

# IBM key -> modformer key; "{}" is the layer index. Shapes are the same on both sides:
# IBM's experts are (N, d_in, d_out) stacks applied as x @ W[e], as ours.
KEY_MAP: dict[str, str] = {
    "transformer.wte.weight": "transformer.wte.weight",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    "transformer.h.{}.ln_1.weight": "transformer.h.{}.ln_1.weight",
    "transformer.h.{}.ln_1.bias": "transformer.h.{}.ln_1.bias",
    "transformer.h.{}.ln_2.weight": "transformer.h.{}.ln_2.weight",
    "transformer.h.{}.ln_2.bias": "transformer.h.{}.ln_2.bias",
    # Attention experts: per-expert query and output projections, and their router
    # (w_gate.0 = B with bias, .1 GELU, .2 dropout, .3 = A without bias).
    "transformer.h.{}.attn.q_proj.experts.weight": "transformer.h.{}.attn.w_q",
    "transformer.h.{}.attn.q_proj.output_experts.weight": "transformer.h.{}.attn.w_o",
    "transformer.h.{}.attn.q_proj.gate.w_gate.0.weight": (
        "transformer.h.{}.attn.router.input_proj.weight"
    ),
    "transformer.h.{}.attn.q_proj.gate.w_gate.0.bias": (
        "transformer.h.{}.attn.router.input_proj.bias"
    ),
    "transformer.h.{}.attn.q_proj.gate.w_gate.3.weight": (
        "transformer.h.{}.attn.router.expert_embedding.weight"
    ),
    # FFN experts and their router.
    "transformer.h.{}.mlpf.experts.weight": "transformer.h.{}.mlp.w_in",
    "transformer.h.{}.mlpf.output_experts.weight": "transformer.h.{}.mlp.w_out",
    "transformer.h.{}.mlpf.gate.w_gate.0.weight": "transformer.h.{}.mlp.router.input_proj.weight",
    "transformer.h.{}.mlpf.gate.w_gate.0.bias": "transformer.h.{}.mlp.router.input_proj.bias",
    "transformer.h.{}.mlpf.gate.w_gate.3.weight": (
        "transformer.h.{}.mlp.router.expert_embedding.weight"
    ),
}

# modformer key <- IBM keys concatenated along dim 0 (W_k and W_v side by side).
CONCATENATED: dict[str, tuple[str, ...]] = {
    "transformer.h.{}.attn.kv_proj.weight": (
        "transformer.h.{}.attn.k_proj.weight",
        "transformer.h.{}.attn.v_proj.weight",
    ),
    "transformer.h.{}.attn.kv_proj.bias": (
        "transformer.h.{}.attn.k_proj.bias",
        "transformer.h.{}.attn.v_proj.bias",
    ),
}

# IBM buffers rebuilt by our model (the causal mask and the stick-breaking carry matrix).
SKIPPED = ("transformer.h.{}.attn.mask", "transformer.h.{}.attn.cum_weight")

_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.")
_PART_OF = {part: target for target, parts in CONCATENATED.items() for part in parts}


def _template(key: str) -> tuple[str, int | None]:
    """``transformer.h.3.ln_1.weight`` -> (``transformer.h.{}.ln_1.weight``, 3)."""
    match = _LAYER_KEY.match(key)
    if match is None:
        return key, None
    return "transformer.h.{}." + key[match.end() :], int(match.group(1))


def _fill(template: str, layer: int | None) -> str:
    return template if layer is None else template.format(layer)


# ---- config --------------------------------------------------------------------------


def _training_only_problems(hf: dict[str, Any]) -> list[str]:
    problems = []
    if hf.get("sample_topk", 0):
        problems.append(f"sample_topk={hf['sample_topk']} (sampled experts in training)")
    if hf.get("moe_pdrop", 0.0):
        problems.append(f"moe_pdrop={hf['moe_pdrop']} (dropout inside the routers)")
    if hf.get("embd_pdrop", 0.0) != hf.get("resid_pdrop", 0.0):
        problems.append(
            f"embd_pdrop={hf.get('embd_pdrop', 0.0)} != resid_pdrop={hf.get('resid_pdrop', 0.0)} "
            "(modformer has one dropout for both; resid_pdrop is kept)"
        )
    return problems


def ibm_config_to_modformer(
    hf: dict[str, Any],
    source: str = "config.json",
    drop_training_options: bool = False,
    history_length: int | None = UNBOUNDED_HISTORY,
) -> ModuleFormerConfig:
    """The `ModuleFormerConfig` computing what IBM's config describes (see the module doc).

    ``history_length``: the memory cap of the imported model (default: unbounded, as
    IBM's code). ``drop_training_options``: import although the config sets options that
    only act in training and have no counterpart here (they are then not carried over).
    """
    if hf.get("model_type") != IBM_MODEL_TYPE:
        raise ConversionError(
            f"{source} describes a {hf.get('model_type')!r} model, not IBM's "
            f"{IBM_MODEL_TYPE!r} (github.com/IBM/ModuleFormer)"
        )
    gate_type = hf.get("gate_type", "mlp")
    if gate_type != "mlp":
        raise ConversionError(
            f"{source}: gate_type={gate_type!r} has no modformer counterpart; only IBM's "
            "'mlp' gate (Linear with bias -> GELU -> Linear) can be imported"
        )
    problems = _training_only_problems(hf)
    if problems and not drop_training_options:
        raise ConversionError(
            f"{source} sets training-only options modformer cannot represent: "
            f"{'; '.join(problems)}. The converted model computes the same function "
            "without them; pass drop_training_options=True (CLI: --drop-training-options) "
            "to import anyway"
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ConversionError(
            f"{source}: activation_function={activation!r} is not supported; modformer "
            f"has {sorted(ACTIVATIONS)}"
        )
    vocab_size = hf.get("vocab_size", 50295)
    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = hf.get(name)
        if isinstance(token, int) and not 0 <= token < vocab_size:
            # IBM's config defaults them to 50256 whatever the vocabulary.
            logger.warning(
                "%s: %s=%d is outside the vocabulary (%d tokens); importing it as None",
                source,
                name,
                token,
                vocab_size,
            )
            token = None
        special[name] = token
    n_layer = hf.get("n_layer", 24)
    n_embd, n_head, att_hidden = (
        hf.get("n_embd", 1024),
        hf.get("n_head", 8),
        hf.get("att_hidden", 512),
    )
    try:
        return ModuleFormerConfig(
            vocab_size=vocab_size,
            n_positions=hf.get("block_size", 512) + hf.get("history_length", 512),
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            att_hidden=att_hidden,
            n_att_experts=hf.get("n_att_experts", 32),
            k_att=hf.get("k_att", 2),
            ffd_hidden=hf.get("ffd_hidden", 2048),
            n_ffd_experts=hf.get("n_mlp_experts", 32),
            k_ffd=hf.get("k_mlp", 2),
            router_hidden=hf.get("gating_size", 256),
            router_activation="gelu",
            router_bias=True,
            kv_bias=not (att_hidden == n_embd and n_head == 1),
            activation_function=activation,
            dropout=hf.get("resid_pdrop", 0.0),
            layer_norm_epsilon=IBM_LAYER_NORM_EPS,
            initializer_range=hf.get("initializer_range", 0.02),
            aux_loss_type=hf.get("aux_loss_type", "mi"),
            # IBM sums the 2 * n_layer per-router losses; ours averages them.
            aux_loss_weight=hf.get("aux_loss_weight", 0.0) * 2 * n_layer,
            use_history=True,
            history_length=history_length,
            use_cache=hf.get("use_cache", True),
            **special,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )
    except (ValueError, StrictDataclassError) as e:  # validation names the field
        message = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        raise ConversionError(f"{source} cannot be represented: {message}") from None


def read_ibm_config(
    src: Path, drop_training_options: bool = False, history_length: int | None = UNBOUNDED_HISTORY
) -> ModuleFormerConfig:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{src} has no config.json; is it an IBM ModuleFormer / MoLM directory?"
        )
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    return ibm_config_to_modformer(hf, str(path), drop_training_options, history_length)


# ---- weights -------------------------------------------------------------------------


def ibm_state_dict_to_modformer(
    weights: dict[str, torch.Tensor], tie_word_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """Rename IBM's tensors to modformer's (`KEY_MAP`), concatenate K/V (`CONCATENATED`)
    and drop the rebuilt buffers (`SKIPPED`). Unknown keys, and a concatenation with a
    part missing, raise a `ConversionError` naming them."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in weights.items():
        template, layer = _template(key)
        if template in SKIPPED:
            continue
        if template == "lm_head.weight" and tie_word_embeddings:
            wte = weights.get("transformer.wte.weight")
            if wte is not None and not torch.equal(value, wte):
                raise ConversionError(
                    "config.json says tie_word_embeddings=true but lm_head.weight differs "
                    "from transformer.wte.weight; fix the config (false) or the weights"
                )
            continue  # the tied head is wte
        if template in KEY_MAP:
            out[_fill(KEY_MAP[template], layer)] = value
        elif template in _PART_OF:
            parts.setdefault(_fill(_PART_OF[template], layer), {})[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"unknown IBM ModuleFormer weights {sorted(unknown)[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}: not part of the layout modformer imports"
        )
    for target, found in parts.items():
        template, layer = _template(target)
        wanted = [_fill(part, layer) for part in CONCATENATED[template]]
        missing = [key for key in wanted if key not in found]
        if missing:
            raise ConversionError(f"{missing} missing: {target} needs all of {wanted}")
        out[target] = torch.cat([found[key] for key in wanted], dim=0)
    return out


def _ibm_names(target: str) -> list[str]:
    """The IBM key(s) a modformer key comes from, for error messages."""
    template, layer = _template(target)
    if template in CONCATENATED:
        return [_fill(part, layer) for part in CONCATENATED[template]]
    return [_fill(src, layer) for src, dst in KEY_MAP.items() if dst == template] or [target]


def load_moduleformer_directory(
    src: str | Path,
    drop_training_options: bool = False,
    history_length: int | None = UNBOUNDED_HISTORY,
) -> ModuleFormerForCausalLM:
    """Build a `ModuleFormerForCausalLM` (fp32, eval mode) from an IBM checkpoint directory."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(
            f"{src} is not a directory; pass a local IBM ModuleFormer / MoLM directory"
        )
    config = read_ibm_config(src, drop_training_options, history_length)
    state = ibm_state_dict_to_modformer(read_checkpoint_weights(src), config.tie_word_embeddings)
    model = ModuleFormerForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        missing_ibm = [name for key in missing for name in _ibm_names(key)]
        raise ConversionError(
            f"{src}: the weights do not fit the config.json; missing {missing_ibm[:8]}, "
            f"unexpected {[n for key in unexpected for n in _ibm_names(key)][:8]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ConversionError(
                f"{src}: {' + '.join(_ibm_names(key))} has shape {tuple(value.shape)} but "
                f"the config.json implies {tuple(expected[key].shape)} for {key}"
            )
        if not value.is_floating_point():
            raise ConversionError(f"{src}: {key} has dtype {value.dtype}, expected floats")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert_moduleformer(
    src: str | Path,
    dst: str | Path,
    drop_training_options: bool = False,
    history_length: int | None = UNBOUNDED_HISTORY,
) -> ModuleFormerForCausalLM:
    """`modformer convert moduleformer SRC DST`: import and save, with SRC's tokenizer files."""
    from modformer.models.io import atomic_save_model
    from modformer.models.model_card import Provenance

    model = load_moduleformer_directory(src, drop_training_options, history_length)
    atomic_save_model(model, dst, Path(src), Provenance(method="convert", source=str(src)))
    return model

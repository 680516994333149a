"""Import a checkpoint of the official Mixture-of-Modules code (github.com/gzhch/
Mixture-of-Modules, `mom/model.py: GPT2MoTLMHeadModel`, model_type ``gpt2-mot``) into
`MoMForCausalLM`. Nothing is downloaded and no code from the checkpoint runs.

Layout (../shared/fixtures/official/README.md): ``transformer.h.i`` is, in order,
``num_bottom_layers`` fixed blocks, then per chunk one routed block (``MoTBlock``) and,
with ``require_anchor_layer``, one anchor fixed block, then ``num_top_layers`` fixed
blocks. That is modformer's chunk string, one entry per ``h.i``, so indices carry over.

What the importer sets, and why:

- Routers: ``router_type`` with "naive" is our MLP router, with "gru" our GRU router.
  With "softmax" in it the weights are ``softmax(logits / router_softmax_temperature)``
  renormalised over the top K (``router_temperature``, ``renormalize=True``); without,
  the raw top-K logits are the weights (``router_output="logits"``).
- ``K = min(routing_top_k, choices)``, as the official top-k does.
- ``num_attn != num_ffn``: chunks of N = max(num_attn, num_ffn), pools of num_attn and
  num_ffn modules (``attn_modules_per_chunk`` / ``ffn_modules_per_chunk``) and
  ``router_width="chunk"``: both routers score N + 1 choices, and a choice beyond a
  smaller pool picks no module, as in the official code.
- ``all_skip_tokens="zero_key"``: the official attention keeps a token whose picks are
  all SKIP as a zero key (only possible with ``routing_top_k`` 1).
- The LM head is tied to ``wte`` (the official model trains under transformers 4 with
  tied weights); ``lm_head.weight``, present in pickled saves, must equal ``wte``.
- ``dropout=0.0`` (the official code has three dropout rates; set ``dropout`` before
  training further) and ``balance_loss_weight=0.0``: the official balance loss (on by
  default, ``router_aux_loss_coef`` 0.01) is a different formula (top-1 counts over the
  softmax of its router scores); ours is opt-in (`MoMConfig.balance_loss_weight`).
- Weights are loaded into an fp32 model whatever their dtype.

Refused with a `ConversionError` naming the field: ``use_ste``,
``routing_all_possible_path``, the ``random``/``dev``/``pgru`` router variants, pools
of one module (the official code turns them into fixed modules run at every step),
``scale_attn_weights=false``, cross-attention and untied heads; ``num_attn != num_ffn``
without SKIP, or with an MLP router and ``num_attn > num_ffn`` (the official code breaks
there).

Pickled ``pytorch_model.bin`` files load with ``torch.load(weights_only=True)``: a file
that needs code to unpickle is refused, never executed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from modformer.convert.checkpoint_files import ConversionError, read_checkpoint_weights
from modformer.models.mom import MoMConfig, MoMForCausalLM

OFFICIAL_MODEL_TYPE = "gpt2-mot"

# ---- key map ---------------------------------------------------------------------------
# Official key (below `transformer.`) -> modformer key, and how the tensor changes.
# "transpose": GPT-2 Conv1D (in, out) -> nn.Linear (out, in). "stack": routed module j
# goes to row j of modformer's stacked (num_modules, ...) parameter, orientation kept.

TOP_LEVEL_KEYS: dict[str, str] = {
    "transformer.wte.weight": "transformer.wte.weight",
    "transformer.wpe.weight": "transformer.wpe.weight",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
}

# Fixed (bottom, anchor, top) block h.i: official suffix -> (modformer suffix, transform).
FIXED_BLOCK_KEYS: dict[str, tuple[str, str]] = {
    "mot_attn.attention_layernorm.weight": ("ln_1.weight", "copy"),
    "mot_attn.attention_layernorm.bias": ("ln_1.bias", "copy"),
    "mot_attn.c_attn.weight": ("attn.c_attn.weight", "transpose"),
    "mot_attn.c_attn.bias": ("attn.c_attn.bias", "copy"),
    "mot_attn.c_proj.weight": ("attn.c_proj.weight", "transpose"),
    "mot_attn.c_proj.bias": ("attn.c_proj.bias", "copy"),
    "mot_ffn.ffn_layernorm.weight": ("ln_2.weight", "copy"),
    "mot_ffn.ffn_layernorm.bias": ("ln_2.bias", "copy"),
    "mot_ffn.c_fc.weight": ("mlp.c_fc.weight", "transpose"),
    "mot_ffn.c_fc.bias": ("mlp.c_fc.bias", "copy"),
    "mot_ffn.c_proj.weight": ("mlp.c_proj.weight", "transpose"),
    "mot_ffn.c_proj.bias": ("mlp.c_proj.bias", "copy"),
}

# Routed chunk h.c, module j (the `{j}` of the official key): -> stacked parameter.
CHUNK_MODULE_KEYS: dict[str, str] = {
    "mot_attn.attention_layernorm.{j}.weight": "attn.ln_weight",
    "mot_attn.attention_layernorm.{j}.bias": "attn.ln_bias",
    "mot_attn.c_attn.{j}.weight": "attn.qkv_weight",
    "mot_attn.c_attn.{j}.bias": "attn.qkv_bias",
    "mot_attn.c_proj.{j}.weight": "attn.proj_weight",
    "mot_attn.c_proj.{j}.bias": "attn.proj_bias",
    "mot_ffn.ffn_layernorm.{j}.weight": "ffn.ln_weight",
    "mot_ffn.ffn_layernorm.{j}.bias": "ffn.ln_bias",
    "mot_ffn.c_fc.{j}.weight": "ffn.fc_weight",
    "mot_ffn.c_fc.{j}.bias": "ffn.fc_bias",
    "mot_ffn.c_proj.{j}.weight": "ffn.proj_weight",
    "mot_ffn.c_proj.{j}.bias": "ffn.proj_bias",
}

# Routers of chunk h.c: official `mot_attn.router.*` / `mot_ffn.router.*` ->
# `policy.attn_router.*` / `policy.ffn_router.*`, unchanged.
GRU_ROUTER_KEYS: dict[str, str] = {
    "x2h.weight": "x2h.weight",
    "x2h.bias": "x2h.bias",
    "h2h.weight": "h2h.weight",
    "h2h.bias": "h2h.bias",
    "router.weight": "out.weight",
    "router.bias": "out.bias",
}
MLP_ROUTER_KEYS: dict[str, str] = {
    "router.0.weight": "fc.weight",
    "router.0.bias": "fc.bias",
    "router.2.weight": "out.weight",
    "router.2.bias": "out.bias",
}
ROUTER_OWNERS = {"mot_attn": "attn_router", "mot_ffn": "ffn_router"}

# Non-persistent attention buffers (causal mask), never weights.
BUFFER_SUFFIXES = ("mot_attn.bias", "mot_attn.masked_bias")

_BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_MODULE_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class _Target:
    """Where one official tensor goes: `key`, row `row` of it (stacked) or all of it."""

    key: str
    row: int | None
    transform: str


# ---- config ----------------------------------------------------------------------------


def _field(hf: dict[str, Any], name: str, default: Any) -> Any:
    value = hf.get(name, default)
    return default if value is None and default is not None else value


def official_config_to_mom(hf: dict[str, Any], where: str = "config.json") -> MoMConfig:
    """The `MoMConfig` of an official ``gpt2-mot`` config dict; unrepresentable options
    raise a `ConversionError` naming the field (`where` names the file)."""
    if hf.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise ConversionError(
            f"{where} describes a {hf.get('model_type')!r} model, not the official MoM "
            f"model_type {OFFICIAL_MODEL_TYPE!r} (GPT2MoTLMHeadModel)"
        )
    refused = {
        "use_ste": "the straight-through sign estimator has no modformer counterpart",
        "routing_all_possible_path": "dense all-path routing has no modformer counterpart",
        "add_cross_attention": "cross-attention is not part of MoM",
    }
    for name, why in refused.items():
        if hf.get(name):
            raise ConversionError(f"{where}: {name}=true is not supported ({why})")
    if hf.get("scale_attn_weights") is False:
        raise ConversionError(f"{where}: scale_attn_weights=false is not supported")
    if hf.get("tie_word_embeddings") is False:
        raise ConversionError(
            f"{where}: tie_word_embeddings=false (an untied LM head) is not supported; the "
            "official MoM models tie lm_head to wte"
        )

    router_type = str(_field(hf, "router_type", "naive"))
    for variant in ("random", "dev", "pgru", "sigmoid"):
        if variant in router_type:
            raise ConversionError(
                f"{where}: router_type={router_type!r} (the {variant!r} variant) is not "
                "supported; only the plain 'gru' / 'naive' routers, with or without softmax"
            )
    if "naive" in router_type:  # the official get_router checks 'naive' first
        router = "mlp"
    elif "gru" in router_type:
        router = "gru"
    else:
        raise ConversionError(
            f"{where}: router_type={router_type!r} names neither a 'gru' nor a 'naive' router"
        )
    softmax = "softmax" in router_type

    num_attn, num_ffn = int(_field(hf, "num_attn", 8)), int(_field(hf, "num_ffn", 8))
    skip = bool(_field(hf, "enable_pause", True))
    for name, n in (("num_attn", num_attn), ("num_ffn", num_ffn)):
        if n < 2:
            raise ConversionError(
                f"{where}: {name}={n}: the official code then runs one fixed module at every "
                "step of a chunk, which modformer does not represent; use at least 2"
            )
    modules = max(num_attn, num_ffn)
    unequal = num_attn != num_ffn
    if unequal and not skip:
        raise ConversionError(
            f"{where}: num_attn={num_attn} != num_ffn={num_ffn} needs enable_pause=true here "
            "(modformer's chunk-wide routers keep SKIP as their last choice)"
        )
    if unequal and router == "mlp" and num_attn > num_ffn:
        raise ConversionError(
            f"{where}: router_type={router_type!r} with num_attn={num_attn} > num_ffn="
            f"{num_ffn}: the official MLP router scores only num_ffn + 1 choices, too few for "
            "the attention pool (the official code fails or loses SKIP there)"
        )
    depth = hf.get("depth_per_chunk")
    steps = int(depth) if depth is not None else int(num_ffn * _field(hf, "depth_multiplier", 4))
    if steps < 1:
        raise ConversionError(
            f"{where}: a chunk runs {steps} steps (depth_per_chunk={depth}, depth_multiplier="
            f"{hf.get('depth_multiplier')}); it needs at least 1"
        )
    sizes = [1] * int(_field(hf, "num_bottom_layers", 1))
    anchor = bool(_field(hf, "require_anchor_layer", True))
    num_chunks = int(_field(hf, "chunks", 4))
    for _ in range(num_chunks):
        sizes += [modules, 1] if anchor else [modules]
    sizes += [1] * int(_field(hf, "num_top_layers", 2))
    temperature = float(_field(hf, "router_softmax_temperature", 1.0)) if softmax else 1.0

    try:
        return MoMConfig(
            vocab_size=int(_field(hf, "vocab_size", 50257)),
            n_positions=int(_field(hf, "n_positions", 1024)),
            n_embd=int(_field(hf, "n_embd", 768)),
            n_head=int(_field(hf, "n_head", 12)),
            n_inner=hf.get("n_inner"),
            activation_function=str(_field(hf, "activation_function", "gelu_new")),
            layer_norm_epsilon=float(_field(hf, "layer_norm_epsilon", 1e-5)),
            initializer_range=float(_field(hf, "initializer_range", 0.02)),
            dropout=0.0,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            chunks="[" + "-".join(str(n) for n in sizes) + "]",
            # The official top-k is min(routing_top_k, number of choices).
            K=min(int(_field(hf, "routing_top_k", 1)), modules + int(skip)),
            H=steps,
            skip=skip,
            router=router,
            router_dim=int(_field(hf, "router_dim", 256)),
            renormalize=softmax,
            router_temperature=temperature,
            router_output="softmax" if softmax else "logits",
            all_skip_tokens="zero_key",
            weighted_qkv=bool(_field(hf, "weighted_qkv", False)),
            # num_attn != num_ffn: both routers score max(num_attn, num_ffn) + SKIP choices.
            router_width="chunk" if unequal else "pool",
            attn_modules_per_chunk=[num_attn] * num_chunks if unequal else None,
            ffn_modules_per_chunk=[num_ffn] * num_chunks if unequal else None,
        )
    except (ValueError, TypeError, StrictDataclassError) as e:
        # `@strict` wraps the validator's ValueError: report the validator's message.
        e = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        raise ConversionError(
            f"{where}: the official config has no modformer MoM equivalent: {e} (official "
            "fields: routing_top_k = K, depth_per_chunk = H, enable_pause = SKIP, num_attn "
            "= modules per chunk)"
        ) from None


def _read_config(src: Path) -> MoMConfig:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{src} has no config.json; is it a directory saved by the official MoM code?"
        )
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    return official_config_to_mom(hf, str(path))


# ---- weights ---------------------------------------------------------------------------


def _target(key: str, kinds: list[str], router: str) -> _Target | None:
    """Where official `key` goes in `MoMForCausalLM`; None when no rule matches.
    kinds[i] is "fixed" or "chunk" for official block h.i."""
    if key in TOP_LEVEL_KEYS:
        return _Target(TOP_LEVEL_KEYS[key], None, "copy")
    match = _BLOCK_KEY.match(key)
    if match is None or int(match.group(1)) >= len(kinds):
        return None
    i, rest = int(match.group(1)), match.group(2)
    prefix = f"transformer.h.{i}."
    if kinds[i] == "fixed":
        if rest in FIXED_BLOCK_KEYS:
            suffix, transform = FIXED_BLOCK_KEYS[rest]
            return _Target(prefix + suffix, None, transform)
        return None
    owner, _, tail = rest.partition(".router.")
    if tail and owner in ROUTER_OWNERS:
        router_keys = GRU_ROUTER_KEYS if router == "gru" else MLP_ROUTER_KEYS
        if tail in router_keys:
            return _Target(
                f"{prefix}policy.{ROUTER_OWNERS[owner]}.{router_keys[tail]}", None, "copy"
            )
        return None
    index = _MODULE_INDEX.search(rest)
    if index is not None:
        pattern = rest[: index.start()] + ".{j}." + rest[index.end() :]
        if pattern in CHUNK_MODULE_KEYS:
            return _Target(prefix + CHUNK_MODULE_KEYS[pattern], int(index.group(1)), "stack")
    return None


def official_state_dict_to_mom(
    weights: dict[str, torch.Tensor], model: MoMForCausalLM, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map an official state dict onto `model`'s keys, checking every key and shape.

    Unknown or missing keys, and any shape that differs from what `model`'s config
    implies, raise a `ConversionError` naming the official key.
    """
    config = model.config
    kinds = ["fixed" if n == 1 else "chunk" for n in config.chunk_sizes]
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[int, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in weights.items():
        if key == "lm_head.weight" or key.endswith(BUFFER_SUFFIXES):
            continue  # the tied head is checked by the caller; mask buffers are not weights
        target = _target(key, kinds, config.router)
        if target is None or target.key not in expected:
            unknown.append(key)
            continue
        want = expected[target.key].shape
        if target.transform == "stack":
            want = want[1:]
            if target.row >= expected[target.key].shape[0]:
                unknown.append(key)
                continue
        elif target.transform == "transpose":
            want = want[::-1]
        if tuple(value.shape) != tuple(want):
            raise ConversionError(
                f"{where}: {key} has shape {tuple(value.shape)}, but this config "
                f"({config.chunks}, n_embd={config.n_embd}, n_inner={config.d_inner}, "
                f"router_dim={config.router_dim}) needs {tuple(want)}"
            )
        if target.transform == "stack":
            rows.setdefault(target.key, {})[target.row] = value
        else:
            out[target.key] = value.t().contiguous() if target.transform == "transpose" else value
    if unknown:
        raise ConversionError(
            f"{where}: {len(unknown)} keys do not belong to an official MoM model of this "
            f"config.json (layout {config.chunks}, router {config.router}): {sorted(unknown)[:6]}"
        )
    missing: list[str] = []
    for key, param in expected.items():
        if key in out:
            continue
        if not _stacked(key):
            missing.append(_official_name(key, None, config.router))
            continue
        present = rows.get(key, {})
        absent = [j for j in range(param.shape[0]) if j not in present]
        if absent:
            missing += [_official_name(key, j, config.router) for j in absent]
        else:
            out[key] = torch.stack([present[j] for j in range(param.shape[0])])
    if missing:
        raise ConversionError(
            f"{where}: {len(missing)} official tensors are missing, e.g. {missing[:6]}; is "
            "config.json the one this checkpoint was saved with?"
        )
    return out


def _stacked(key: str) -> bool:
    """Whether modformer parameter `key` stacks one official tensor per routed module."""
    return any(key.endswith("." + name) for name in CHUNK_MODULE_KEYS.values())


def _official_name(key: str, row: int | None, router: str) -> str:
    """The official key that modformer parameter `key` (row `row` if stacked) comes from."""
    reverse_top = {v: k for k, v in TOP_LEVEL_KEYS.items()}
    if key in reverse_top:
        return reverse_top[key]
    block, _, rest = key.removeprefix("transformer.h.").partition(".")
    prefix = f"transformer.h.{block}."
    if row is not None:
        pattern = {v: k for k, v in CHUNK_MODULE_KEYS.items()}[rest]
        return prefix + pattern.format(j=row)
    for official, (suffix, _) in FIXED_BLOCK_KEYS.items():
        if rest == suffix:
            return prefix + official
    router_keys = GRU_ROUTER_KEYS if router == "gru" else MLP_ROUTER_KEYS
    for owner, module in ROUTER_OWNERS.items():
        for official, ours in router_keys.items():
            if rest == f"policy.{module}.{ours}":
                return f"{prefix}{owner}.router.{official}"
    return key  # no official counterpart known: name the modformer parameter


# ---- entry points ----------------------------------------------------------------------


def load_mom_official(src: str | Path) -> MoMForCausalLM:
    """Build an fp32 `MoMForCausalLM` (eval mode) from a local official MoM directory
    (config.json + model.safetensors or pytorch_model.bin)."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory; pass a local official MoM directory")
    config = _read_config(src)
    weights = read_checkpoint_weights(src)
    model = MoMForCausalLM(config)
    state = official_state_dict_to_mom(weights, model, str(src))
    head = weights.get("lm_head.weight")
    if head is not None and not torch.equal(head, weights["transformer.wte.weight"]):
        raise ConversionError(
            f"{src}: lm_head.weight differs from transformer.wte.weight, i.e. the head is "
            "untied; modformer's MoM ties them (as the official model does under transformers 4)"
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def convert_mom_official(src: str | Path, dst: str | Path) -> MoMForCausalLM:
    """`modformer convert mom-official SRC DST`: import and save, with SRC's tokenizer files."""
    from modformer.models.io import atomic_save_model
    from modformer.models.model_card import Provenance

    model = load_mom_official(src)
    atomic_save_model(model, dst, Path(src), Provenance(method="convert", source=str(src)))
    return model

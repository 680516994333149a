"""Load a saved modformer model (and its tokenizer) from a directory, with clear errors.

`load_pretrained` is the one door every command's model goes through. It refuses, with a
message naming the directory and the fix, anything that would otherwise load as a
silently wrong model: a config.json that is not JSON or describes another architecture
(BERT, ...), files that do not match the directory's manifest.json, weights missing from
or not fitting the config (which `from_pretrained` would fill with a random init), pickled
weights (never unpickled: only safetensors are read) and non-finite parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import modformer.models  # noqa: F401  (registers the architectures with the Auto classes)
from modformer.models.io import MANIFEST_FILE, CheckpointError, verify_manifest


class ModelLoadError(ValueError):
    """A model directory cannot be loaded as what it claims to be; the message says why."""


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model directory or a training run's out_dir (whose final model is in model/)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    raise FileNotFoundError(
        f"{path} holds no saved model (no config.json); pass a model directory or a "
        "training out_dir, or convert a checkpoint with `modformer convert`"
    )


def modformer_model_types() -> dict[str, str]:
    """config.json `model_type` -> architecture name, for every modformer architecture."""
    from modformer.models.registry import ARCHITECTURES

    return {config_cls.model_type: arch for arch, (config_cls, _) in ARCHITECTURES.items()}


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a modformer model directory, checked to be one of ours."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"{path} is not valid JSON ({e}); re-save or re-convert the model"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(config).__name__}")
    types = modformer_model_types()
    model_type = config.get("model_type")
    if model_type not in types:
        hint = (
            "; import it with `modformer convert gpt2`"
            if model_type == "gpt2"
            else "; modformer loads only models it saved (`modformer train`, `convert`, ...)"
        )
        raise ModelLoadError(
            f"{path} describes a {model_type!r} model, not a modformer model "
            f"({', '.join(sorted(types))}){hint}"
        )
    return config


def check_finite(model: torch.nn.Module, where: str) -> None:
    """Raise ModelLoadError naming the first parameter or buffer holding NaN or inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(
                f"{where}: {name} holds NaN or inf values; the model is broken (a diverged "
                "training run?): use an earlier checkpoint or retrain"
            )


def load_pretrained(
    model_dir: str | Path, model_cls: type[PreTrainedModel] | None = None
) -> PreTrainedModel:
    """`from_pretrained` of a modformer model directory, refusing anything but an exact
    load (see the module docstring). `model_cls` defaults to the Auto class."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json")
    read_model_config(model_dir)
    if (model_dir / MANIFEST_FILE).is_file():
        try:
            verify_manifest(model_dir, "model directory")
        except CheckpointError as e:
            raise ModelLoadError(f"{e}; re-save the model or use a backup") from None
    has_safetensors = (model_dir / "model.safetensors").is_file() or (
        model_dir / "model.safetensors.index.json"
    ).is_file()
    if not has_safetensors:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [
            p.name for p in model_dir.glob("*.pt")
        ]
        found = (
            f" (found {', '.join(sorted(pickled))}, which is never unpickled)" if pickled else ""
        )
        raise ModelLoadError(
            f"{model_dir} has no model.safetensors{found}; only safetensors weights are loaded"
        )
    cls = model_cls or AutoModelForCausalLM
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat our error, as a table
    try:
        model, info = cls.from_pretrained(model_dir, output_loading_info=True, use_safetensors=True)
    except Exception as e:  # corrupt safetensors, shapes that do not fit, a bad config value
        cause = e.__cause__ if e.__cause__ is not None else e
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if "mismatched_sizes" in message:
            message = "weight shapes do not match config.json"
        raise ModelLoadError(f"cannot load the model in {model_dir}: {message}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise ModelLoadError(
            f"the weights in {model_dir} do not match its config.json ({'; '.join(problems)}); "
            "a model loaded from it would be partly random: re-save or re-convert it"
        )
    check_finite(model, str(model_dir))
    return model


def load_model(path: str | Path, device: str = "cpu") -> PreTrainedModel:
    from modformer.devices import resolve_device

    model_dir = resolve_model_dir(path)
    target = resolve_device(device)  # before loading: a clear error for a missing CUDA
    return load_pretrained(model_dir).to(target).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast | None:
    """The tokenizer saved beside the model, or None when there is none."""
    model_dir = resolve_model_dir(path)
    if not (model_dir / "tokenizer.json").is_file():
        return None
    try:
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    except Exception as e:  # a corrupt tokenizer.json or tokenizer_config.json
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir} ({e})") from None

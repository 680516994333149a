"""Load a saved modformer model (and its tokenizer) from a directory, with clear errors."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import modformer.models  # noqa: F401  (registers the architectures with the Auto classes)


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


def load_model(path: str | Path, device: str = "cpu") -> PreTrainedModel:
    model_dir = resolve_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast | None:
    """The tokenizer saved beside the model, or None when there is none."""
    model_dir = resolve_model_dir(path)
    if not (model_dir / "tokenizer.json").is_file():
        return None
    return PreTrainedTokenizerFast.from_pretrained(model_dir)

"""Read the weights of a local Hugging Face checkpoint directory, safely.

Safetensors (one file or an indexed set of shards) are preferred. A pickled
``pytorch_model.bin`` (or its indexed shards) is read only with
``torch.load(weights_only=True)``: a file that needs any code to unpickle is refused.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from modformer.convert.gpt2 import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def _shards(src: Path, index_name: str) -> list[Path]:
    path = src / index_name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{path} is not a valid shard index ({e})") from None
    shards = [src / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ConversionError(f"{path} lists {shard.name}, which is not in {src}")
    return shards


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"{path} is unreadable or truncated ({e})") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path} needs code to unpickle, which modformer never runs ({e}); convert it "
            "to safetensors with the library that wrote it, or re-save a plain state dict"
        ) from None
    except Exception as e:
        raise ConversionError(f"{path} is not a readable torch.save file ({e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path} does not hold a state dict (a name -> tensor mapping)")
    return state


def read_checkpoint_weights(src: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `src`, by name, on the CPU."""
    src = Path(src)
    if (src / "model.safetensors").is_file():
        return _load_safetensors(src / "model.safetensors")
    if (src / SAFETENSORS_INDEX).is_file():
        weights: dict[str, torch.Tensor] = {}
        for shard in _shards(src, SAFETENSORS_INDEX):
            weights.update(_load_safetensors(shard))
        return weights
    if (src / "pytorch_model.bin").is_file():
        return _load_pickle(src / "pytorch_model.bin")
    if (src / PICKLE_INDEX).is_file():
        weights = {}
        for shard in _shards(src, PICKLE_INDEX):
            weights.update(_load_pickle(shard))
        return weights
    raise ConversionError(
        f"{src} has no model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or {PICKLE_INDEX}"
    )

"""Read the weights of a local checkpoint directory, safely; shared by every importer.

`model.safetensors` is preferred, else `pytorch_model.bin`, or the shards listed by
their `.index.json`. Pickles are loaded only with ``torch.load(weights_only=True)``
(tensors and plain containers): a file that needs code to unpickle is refused, never run.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message says why and what to do."""


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, loaded with `weights_only=True`: tensors and plain
    containers only. A file that needs code to unpickle is refused, not run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} needs code to unpickle, and modformer loads pickles only with "
            f"torch.load(weights_only=True) ({first_line}). Refusing to run it; if you trust "
            "the file, re-save its state dict as model.safetensors yourself"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConversionError(f"{path} is unreadable or truncated ({e})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{path} does not hold a state dict (name -> tensor)")
    return state


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path} is unreadable or truncated ({e})") from None
    return load_pickled_state_dict(path)


def read_checkpoint_weights(src: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of `src`: `model.safetensors`, else `pytorch_model.bin`, or the
    shards listed by their `.index.json`; every tensor on the CPU."""
    src = Path(src)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return _load_one(src / name)
        index_path = src / f"{name}.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_path} is not a shard index ({e})") from None
            weights: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (src / shard).is_file():
                    raise ConversionError(f"{index_path} lists {shard}, which is missing")
                weights.update(_load_one(src / shard))
            return weights
    raise ConversionError(
        f"{src} has no model.safetensors or pytorch_model.bin (nor a sharded index of them)"
    )

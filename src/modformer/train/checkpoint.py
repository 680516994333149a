"""Checkpoints and saved models: atomic, hashed, and loadable without unpickling.

A checkpoint `step_000100/` holds

    model/                       save_pretrained (config.json, model.safetensors) + tokenizer
                                 files + its own manifest.json
    trainer_state.safetensors    every tensor of the trainer state (optimizer moments, RNG
                                 states), under names such as `optimizer.state.0.exp_avg`
    trainer_state.json           everything else (step, config, scheduler, data position),
                                 with each tensor replaced by {"__tensor__": name}
    manifest.json                sha256 and size of every file above

Nothing is pickled, so loading a checkpoint cannot run code. It is written into a
`.step_000100.tmp-*` directory and renamed into place, so a crash mid-write leaves only
that temp directory, which is never loaded and is removed by `clean_stale` at the next
start. On resume the manifest is verified: a checkpoint whose files do not match it is
reported by name, moved aside as `step_000100.corrupt`, and the newest intact one is used.

Saved model directories and their manifests are `modformer.models.io`'s; a checkpoint's
`model/` is one, and its own manifest.json covers the whole checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from modformer.models.io import (  # noqa: F401  (re-exported: the checkpoint API)
    MANIFEST_FILE,
    CheckpointError,
    _replace_dir,
    atomic_save_model,
    disk_full,
    file_sha256,
    save_model_files,
    set_special_token_ids,
    tokenizer_special_ids,
    verify_manifest,
    write_manifest,
)
from modformer.utils import chmod_like_new_files, make_temp_dir

log = logging.getLogger("modformer.checkpoint")

CKPT_RE = re.compile(r"^step_(\d{6,})$")
STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # pickled by modformer < 0.2: never unpickled
STATE_FORMAT_VERSION = 1


def clean_stale(directory: str | Path) -> list[Path]:
    """Remove the `.NAME.tmp-*` / `.NAME.old-*` leftovers of saves that were killed.

    Call only while holding the directory's run lock, so no live save is touched."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for stale in directory.iterdir():
        if stale.name.startswith(".") and (".tmp-" in stale.name or ".old-" in stale.name):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    if removed:
        log.info("removed %d stale temp file(s) in %s", len(removed), directory)
    return removed


# ---- RNG state ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- trainer state: safetensors + JSON -----------------------------------------------------
# The JSON tree is the state with every tensor (and numpy array) replaced by a reference
# into the safetensors file; tuples and dicts with non-string keys (optimizer state is
# keyed by parameter index) are tagged so they come back as they went in.

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], name: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iub":
            raise TypeError(f"{name}: only integer numpy arrays are stored, got {obj.dtype}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64, copy=False))
        return {"__ndarray__": name, "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, f"{name}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{name}.key{i}"), _encode(v, tensors, f"{name}.{k}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state {name}: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_trainer_state(state: dict[str, Any], directory: str | Path) -> None:
    """Write `state` (tensors, numpy int arrays and plain Python values) as
    trainer_state.safetensors + trainer_state.json in `directory`."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "state")
    save_file(tensors, directory / STATE_TENSORS_FILE)
    doc = {"format_version": STATE_FORMAT_VERSION, "state": tree}
    # allow_nan: a non-finite float (e.g. a loss) must round-trip rather than fail the save.
    (directory / STATE_JSON_FILE).write_text(json.dumps(doc, indent=1))


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """The state written by `save_trainer_state` (no manifest check; see load_trainer_state)."""
    directory = Path(directory)
    try:
        doc = json.loads((directory / STATE_JSON_FILE).read_text())
        if doc.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"format_version {doc.get('format_version')!r}")
        tensors = load_file(directory / STATE_TENSORS_FILE)
        return _decode(doc["state"], tensors)
    except Exception as e:  # truncated, corrupt or hand-edited files
        raise CheckpointError(
            f"the trainer state in {directory} is unreadable ({type(e).__name__}: {e})"
        ) from None


# ---- checkpoints -------------------------------------------------------------------------


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: PreTrainedModel,
    trainer_state: dict[str, Any],
    keep_last: int,
    tokenizer_dir: Path | None = None,
) -> Path:
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    dest = ckpt_root / f"step_{step:06d}"
    tmp = make_temp_dir(ckpt_root, prefix=f".{dest.name}.tmp-")
    try:
        save_model_files(model, tmp / "model", tokenizer_dir)
        save_trainer_state(trainer_state, tmp)
        chmod_like_new_files(tmp)  # safetensors writes 0600 whatever the umask
        write_manifest(tmp)
        _replace_dir(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            previous = latest_checkpoint(ckpt_root)
            kept = f"the last checkpoint, {previous}, is intact" if previous else "no checkpoint"
            raise CheckpointError(
                f"no space left on the device while writing checkpoint {dest}; the partial "
                f"checkpoint was removed and {kept}; free some space and run again with --resume"
            ) from None
        raise
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    clean_stale(ckpt_root)
    return dest


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def verify_checkpoint(ckpt: str | Path) -> None:
    """Raise CheckpointError (naming the file) unless `ckpt` is complete and matches its
    manifest."""
    ckpt = Path(ckpt)
    if not (ckpt / MANIFEST_FILE).is_file() and (ckpt / LEGACY_STATE_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} holds a pickled {LEGACY_STATE_FILE} (an older modformer's "
            "format), which is never loaded because unpickling can run arbitrary code; "
            "start the run again in a new out_dir"
        )
    verify_manifest(ckpt, "checkpoint")
    sharded = (ckpt / "dcp").is_dir()  # written by modformer.train.dist_checkpoint (FSDP)
    required = (
        (STATE_JSON_FILE,)
        if sharded
        else (STATE_TENSORS_FILE, STATE_JSON_FILE, "model/config.json")
    )
    for name in required:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing")


def find_resume_checkpoint(ckpt_root: str | Path, move_aside: bool = True) -> Path | None:
    """The newest intact checkpoint under `ckpt_root` (None when there is none at all).

    Newer checkpoints that fail verification are reported by name and, with `move_aside`
    (rank 0 only, so ranks do not race), moved aside as `step_N.corrupt`: kept for
    inspection, never loaded. When every checkpoint is broken nothing is moved and
    CheckpointError lists them.
    """
    ckpts = list_checkpoints(ckpt_root)
    broken: list[tuple[Path, str]] = []
    for ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            broken.append((ckpt, str(e)))
            continue
        for bad, reason in broken:
            if not move_aside:
                continue
            aside = bad.with_name(bad.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(bad, aside)
            log.warning("%s; moved it to %s and resume from %s instead", reason, aside, ckpt)
        return ckpt
    if broken:
        reasons = "; ".join(reason for _, reason in broken)
        raise CheckpointError(
            f"no intact checkpoint in {ckpt_root}: {reasons}; delete the broken checkpoints "
            "(or the whole out_dir) to start again"
        )
    return None


def load_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    """The verified trainer state of checkpoint `ckpt`."""
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    return read_trainer_state(ckpt)

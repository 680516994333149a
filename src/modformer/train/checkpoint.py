"""Atomic checkpoints: each is a directory written under a temporary name and renamed.

A checkpoint `step_000100/` holds `model/` (save_pretrained, safetensors) and
`trainer_state.pt` (optimizer, scheduler, RNG states, step, data position, config). A
crash mid-write leaves only a `.tmp-*` directory, which is never loaded and is cleaned up
on the next save.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from modformer.utils import TOKENIZER_FILES, chmod_like_new_files, make_temp_dir

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message says which and what to do."""


def tokenizer_special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """The bos/eos/pad token ids of the tokenizer saved in `tokenizer_dir` ({} when there is
    no loadable tokenizer with an end-of-text token there)."""
    from modformer.data.corpus import DataError
    from modformer.data.tokenizer import load_hf_tokenizer

    try:
        tokenizer = load_hf_tokenizer(tokenizer_dir).tokenizer
    except DataError as e:
        log.warning("saving the model without special token ids: %s", e)
        return {}
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {name: value for name, value in ids.items() if value is not None}


def set_special_token_ids(model: PreTrainedModel, ids: dict[str, int]) -> None:
    """Write the tokenizer's ids into the config and the generation config, so that HF
    `generate` and pipelines stop at end-of-text and pad with the right token."""
    for name, value in ids.items():
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)


def save_model_files(model: PreTrainedModel, dest: Path, tokenizer_dir: Path | None = None) -> None:
    """`save_pretrained` plus the tokenizer files beside it, so that `from_pretrained(dest)`
    works for both the model and `AutoTokenizer` (generation, lm-eval). The tokenizer's
    bos/eos/pad ids go into config.json and generation_config.json."""
    has_tokenizer = tokenizer_dir is not None and any(
        (tokenizer_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")
    )
    if has_tokenizer:
        set_special_token_ids(model, tokenizer_special_ids(tokenizer_dir))
    model.save_pretrained(dest, safe_serialization=True)
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file() and not (dest / name).exists():
                shutil.copyfile(tokenizer_dir / name, dest / name)
    chmod_like_new_files(dest)  # outputs honour the umask, like every other file we write


def atomic_save_model(
    model: PreTrainedModel, dest: str | Path, tokenizer_dir: Path | None = None
) -> Path:
    """Save into a temp dir next to `dest`, then swap it in by rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}.tmp-")
    try:
        save_model_files(model, tmp, tokenizer_dir)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; an existing `dest` is moved aside first and then deleted."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


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
        torch.save(trainer_state, tmp / STATE_FILE)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
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


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} has no {STATE_FILE}; delete it or resume from an older one"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({e}); delete {ckpt} to resume from an older one"
        ) from None

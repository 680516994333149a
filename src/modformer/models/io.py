"""Saved models on disk: atomic saves, integrity manifests, the tokenizer's special ids.

`atomic_save_model` writes a model directory (save_pretrained: config.json,
model.safetensors and the model's own code; the tokenizer files; a manifest.json of
sha256 hashes; a model card README.md) into a temp directory beside the destination and
renames it into place, so a crash leaves the old directory or the new one, never a mix.
`verify_manifest` checks such a directory (and a training checkpoint) before it is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from transformers import PreTrainedModel

from modformer.errors import ModformerError
from modformer.models.model_card import Provenance, write_model_card
from modformer.utils import TOKENIZER_FILES, chmod_like_new_files, make_temp_dir

log = logging.getLogger("modformer.checkpoint")

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


class CheckpointError(ModformerError):
    """A checkpoint is missing, corrupt or unreadable; the message says which and what to do."""


# ---- manifests -------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """Write `directory/manifest.json`: sha256 and size of every file below `directory`."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_FILE:
            continue
        files[rel] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest = {"format_version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    out = directory / MANIFEST_FILE
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def verify_manifest(directory: str | Path, what: str = "directory") -> None:
    """Check every file listed in `directory/manifest.json` exists with its size and hash.

    Files not listed are ignored (a user may add a README). Raises CheckpointError naming
    the first file that is missing or differs.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except FileNotFoundError:
        raise CheckpointError(f"{what} {directory} has no {MANIFEST_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt ({e})") from None
    for rel, entry in files.items():
        file = directory / rel
        if not file.is_file():
            raise CheckpointError(f"{what} {directory}: {rel} is missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(
                f"{what} {directory}: {rel} has {size} bytes, the manifest says {entry.get('bytes')} "
                "(truncated or replaced)"
            )
        if file_sha256(file) != entry.get("sha256"):
            raise CheckpointError(
                f"{what} {directory}: {rel} does not match its sha256 in {MANIFEST_FILE} (corrupt)"
            )


# ---- saving models ---------------------------------------------------------------------


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
    bos/eos/pad ids go into config.json and generation_config.json. Last, the manifest of
    everything written."""
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
    write_manifest(dest)
    chmod_like_new_files(dest)  # outputs honour the umask, like every other file we write


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_save_model(
    model: PreTrainedModel,
    dest: str | Path,
    tokenizer_dir: Path | None = None,
    provenance: Provenance | None = None,
) -> Path:
    """Save into a temp dir next to `dest`, then swap it in by rename. Beside the model:
    its remote code (save_pretrained) and a model card README.md from `provenance`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}.tmp-")
    try:
        save_model_files(model, tmp, tokenizer_dir)
        write_model_card(model, tmp, provenance, path=dest)
        _replace_dir(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise CheckpointError(
                f"no space left on the device while saving the model to {dest}; the partial "
                "copy was removed; free some space and run again"
            ) from None
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

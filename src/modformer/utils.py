"""Small shared helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Files that make up a Hugging Face tokenizer; copied beside a saved model so that
# `AutoTokenizer.from_pretrained(model_dir)` works (generation, lm-eval).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1
RETAIN_MEMORY_ENV = "MODFORMER_RETAIN_FREED_MEMORY"


def retain_freed_memory() -> bool:
    """Keep CPU memory that PyTorch frees inside the process, for reuse (glibc only).

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
    mmap and unmaps it on free, so a training step page-faults its large tensors in
    again on every step: about 7 us per 4 KiB page on a small VM, 0.1 s per step for the
    64 MiB of expert-weight gradients of the SMoE benchmark. PyTorch's CUDA caching
    allocator keeps freed blocks for reuse; this does the same on CPU by turning off
    glibc's mmap path and its trimming of the heap. The cost: the process keeps its
    peak heap size until it exits, which a training run reaches anyway.

    Called by the `modformer` CLI and the benchmarks; set MODFORMER_RETAIN_FREED_MEMORY=0
    to keep glibc's defaults. Returns whether the setting took effect (False on
    non-glibc systems, e.g. macOS or musl, where nothing is changed).
    """
    if os.environ.get(RETAIN_MEMORY_ENV, "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))

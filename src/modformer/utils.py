"""Small shared helpers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh directory in `parent` for atomic writes, with the mode `mkdir` would give it
    (mkdtemp makes it 0700 whatever the umask; once renamed into place it is an output)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o777 & ~current_umask())
    return path


def chmod_like_new_files(root: str | Path) -> None:
    """Give the files under `root` the mode `open` would (0666 less the umask): the
    safetensors writer makes its files 0600 whatever the umask."""
    file_mode = 0o666 & ~current_umask()
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside `path` to write to; it replaces `path` when the block ends
    without an error and is removed otherwise. Its mode is the one `open` would give a new
    file (mkstemp makes it 0600 whatever the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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

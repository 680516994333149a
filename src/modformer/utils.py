"""Small shared helpers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: DirectoryLock falls back to an O_EXCL lock file
    fcntl = None  # type: ignore[assignment]

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


class OutputPathError(ValueError):
    """An output path cannot be written; the message names the path and the reason."""


def check_output_path(path: str | Path, what: str = "output", directory: bool = False) -> Path:
    """Check, before any work starts, that `path` can be created or replaced: no parent is
    a regular file, it is not a directory where a file goes (or the reverse), and the
    nearest existing parent is writable. Returns `path` as a Path."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            raise OutputPathError(f"{what} {path} exists and is not a directory")
        if not directory and path.is_dir():
            raise OutputPathError(f"{what} {path} is a directory; pass a file path")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    # `exists()` is False under a regular file, so the loop stops at that file.
    if not parent.is_dir():
        raise OutputPathError(f"cannot create {what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create {what} {path}: {parent} is not writable")
    return path


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


LOCK_FILE = ".modformer.lock"


class DirectoryLock:
    """An exclusive lock on a directory while one process writes it (a training out_dir).

    Holds `fcntl.flock` on `DIR/.modformer.lock`, which records the holder's pid for the
    error message. The kernel drops the lock when the holder exits, however it exits, so
    a killed run never leaves a stale lock. Where `fcntl` is missing the lock file is
    created with O_EXCL instead, and a lock whose pid no longer runs is taken over.
    """

    def __init__(self, directory: str | Path, what: str = "run") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def _busy(self, pid: str) -> Exception:
        from modformer.errors import ModformerError

        holder = f"pid {pid}" if pid else "another process"
        return ModformerError(
            f"{self.directory} is in use by another {self.what} ({holder}); wait for it to "
            "finish or use another directory"
        )

    def acquire(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self._acquire_exclusive_create()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise self._busy(pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _acquire_exclusive_create(self) -> DirectoryLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = self.path.read_text(errors="replace").strip()
                if pid.isdigit() and _pid_alive(int(pid)):
                    raise self._busy(pid) from None
                self.path.unlink(missing_ok=True)  # stale: its holder is gone
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        raise self._busy("")

    def release(self) -> None:
        if self._fd is None:
            return
        if fcntl is None:
            self.path.unlink(missing_ok=True)
        else:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

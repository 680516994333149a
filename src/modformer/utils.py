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

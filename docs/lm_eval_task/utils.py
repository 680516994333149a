"""Dataset loader for the local lm-eval task in this directory.

lm-eval resolves `!function utils.load_local_jsonl` to this file, so the JSONL path is
taken relative to this directory rather than to the working directory; the data never
goes through the Hugging Face hub or its download cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def load_local_jsonl(data_file: str, **_: Any) -> datasets.DatasetDict:
    """The records of `data_file` (one JSON object per line) as the "test" split.

    lm-eval also passes the task's metadata as keyword arguments; they are not needed.
    """
    path = Path(data_file)
    if not path.is_absolute():
        path = Path(__file__).parent / path
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})

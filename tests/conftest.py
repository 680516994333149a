"""Shared fixtures: a tiny prepared data set (byte tokenizer, so no tokenizer training)."""

from __future__ import annotations

import logging
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

import modformer
from modformer.data.prepare import prepare

# The suite's tensors are small: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)

# ---- transformers deprecations fail the test that triggers them -------------------------
# A rename in transformers (5.24: `past_key_values` -> `cache`) first shows as a deprecation,
# and only later as a break, so the suite treats every deprecation that transformers reports
# while our code runs as an error. transformers reports some through `warnings` and some only
# through its logger (`logger.warning_once`), so both are watched.
_DEPRECATION = re.compile(r"deprecat|will be removed|no longer supported", re.IGNORECASE)
_WATCHED_FILES = tuple(
    str(Path(package).parent) for package in (transformers.__file__, modformer.__file__, __file__)
)


class _DeprecationRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _DEPRECATION.search(message):
            self.messages.append(f"transformers logger ({record.name}): {message}")


def deprecations_in(caught: list[warnings.WarningMessage]) -> list[str]:
    """Deprecation warnings raised from transformers', modformer's or the tests' files."""
    return [
        f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
        and w.filename.startswith(_WATCHED_FILES)
    ]


@pytest.fixture(autouse=True)
def fail_on_transformers_deprecations(request):
    """Fails the test if transformers reported a deprecation while it ran. Opt out with
    `@pytest.mark.allow_deprecations` (for a test that checks a deprecated path on purpose)."""
    if request.node.get_closest_marker("allow_deprecations"):
        yield
        return
    records = _DeprecationRecords()
    library_logger = hf_logging.get_logger("transformers")
    library_logger.addHandler(records)
    # `warning_once` remembers what it has said: forget it, so each test sees its own.
    logging.Logger.warning_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    library_logger.removeHandler(records)
    found = records.messages + deprecations_in(caught)
    if found:
        pytest.fail("transformers reported a deprecation:\n" + "\n".join(found), pytrace=False)


def _synthetic_documents(n: int, seed: int) -> list[str]:
    """Highly regular text, so that even a minute of training lowers the loss visibly."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(5, 15)):
            w = rng.sample(words, 3)
            lines.append(f"def {w[0]}_{w[1]}(x): return x + {w[2]}")
        docs.append("\n".join(lines))
    return docs


def make_text_inputs(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(_synthetic_documents(n_docs, seed)):
        (root / f"doc{i:03d}.txt").write_text(doc)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    inputs = make_text_inputs(root / "text")
    out = root / "prepared"
    prepare(out, inputs=[f"synthetic={inputs}"], tokenizer="byte", progress=False)
    return out

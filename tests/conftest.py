"""Shared fixtures: a tiny prepared data set (byte tokenizer, so no tokenizer training)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from modformer.data.prepare import prepare

# The suite's tensors are small: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)


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

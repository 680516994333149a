"""What each training step reads: random windows drawn by (seed, step) so that a resumed
run sees the same batches, or consecutive segments per row for Transformer-XL history."""

from __future__ import annotations

import numpy as np
import torch

from modformer.config import ConfigError
from modformer.data.dataset import TokenDataset


def batch_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 131 + micro)
    return g


class SequentialStream:
    """Each batch row reads consecutive segments of its own slice of the token stream, so a
    model with Transformer-XL history sees segment s+1 right after segment s."""

    def __init__(
        self, dataset: TokenDataset, batch_size: int, block_size: int, rank: int, world: int
    ):
        tokens = dataset.tokens
        rows = batch_size * world
        self.row_len = len(tokens) // rows
        if self.row_len < block_size:
            raise ConfigError(
                f"data.sequential: {len(tokens)} tokens cannot feed {rows} rows of {block_size}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.starts = [(rank * batch_size + b) * self.row_len for b in range(batch_size)]
        self.segments_per_row = self.row_len // block_size

    def batch(self, index: int) -> torch.Tensor:
        offset = (index % self.segments_per_row) * self.block_size
        rows = [self.tokens[s + offset : s + offset + self.block_size] for s in self.starts]
        return torch.as_tensor(np.stack(rows).astype(np.int64))

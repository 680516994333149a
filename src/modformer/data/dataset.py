"""Reading prepared data: token windows for training and evaluation.

`TokenDataset` opens one split of a `modformer prepare` directory as a read-only memmap,
checks it against `meta.json`, and serves

- `get_batch`: random windows, nanoGPT style, drawn with a caller-owned `torch.Generator`
  so a batch is a pure function of the generator state (seed it from (seed, step) to
  make every training step's batch reproducible);
- `iter_sequential`: every non-overlapping window in order, for evaluation.

A window is `block_size` consecutive tokens; the model shifts labels itself
(`model(input_ids=x, labels=x)`), so no separate target tensor is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from modformer.data.corpus import DataError
from modformer.data.prepare import FORMAT_VERSION, META_FILE, SPLITS, TOKENIZER_DIR
from modformer.data.tokenizer import token_dtype

_PREPARE_HINT = "run `modformer prepare {path}` to create it"


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The validated `meta.json` of a prepared data directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {str(data_dir)!r} does not exist; "
            + _PREPARE_HINT.format(path=data_dir)
        )
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"{str(meta_path)!r} is missing, so {str(data_dir)!r} is not a complete prepared "
            "data directory; " + _PREPARE_HINT.format(path=data_dir)
        )
    try:
        with open(meta_path, encoding="utf-8") as file:
            meta = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"{str(meta_path)!r} is unreadable or corrupt ({error}); re-run "
            f"`modformer prepare {data_dir} --overwrite`"
        ) from error
    _validate_meta(meta, meta_path)
    return meta


def _validate_meta(meta: Any, meta_path: Path) -> None:
    def fail(problem: str) -> DataError:
        return DataError(
            f"{str(meta_path)!r}: {problem}; re-run `modformer prepare "
            f"{meta_path.parent} --overwrite` with this version of modformer"
        )

    if not isinstance(meta, dict):
        raise fail("not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise fail(
            f"format_version is {meta.get('format_version')!r}, this reader expects "
            f"{FORMAT_VERSION}"
        )
    for key in ("dtype", "vocab_size", "eos_token_id", "splits", "domains"):
        if key not in meta:
            raise fail(f"missing key {key!r}")
    vocab_size = meta["vocab_size"]
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise fail(f"vocab_size {vocab_size!r} is not a positive integer")
    if meta["dtype"] != token_dtype(vocab_size).name:
        raise fail(f"dtype {meta['dtype']!r} does not match vocab_size {vocab_size}")
    eos = meta["eos_token_id"]
    if not isinstance(eos, int) or not 0 <= eos < vocab_size:
        raise fail(f"eos_token_id {eos!r} is outside the vocabulary [0, {vocab_size})")
    for split in SPLITS:
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("tokens"), int):
            raise fail(f"splits.{split} is missing or has no token count")
        max_id = info.get("max_token_id")  # absent in data prepared before it was recorded
        if max_id is not None and (not isinstance(max_id, int) or not -1 <= max_id < vocab_size):
            raise fail(f"splits.{split}.max_token_id {max_id!r} is outside [0, {vocab_size})")
        position = 0
        for name, bounds in info.get("domains", {}).items():
            if (
                not isinstance(bounds, list)
                or len(bounds) != 2
                or bounds[0] != position
                or not bounds[0] <= bounds[1] <= info["tokens"]
            ):
                raise fail(f"splits.{split}.domains.{name} = {bounds!r} is not a valid range")
            position = bounds[1]
        if position != info["tokens"]:
            raise fail(
                f"the domain ranges of splits.{split} do not cover its {info['tokens']} tokens"
            )


def load_tokenizer(data_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer a prepared data directory was made with."""
    tokenizer_dir = Path(data_dir) / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise DataError(
            f"no tokenizer at {str(tokenizer_dir)!r}; " + _PREPARE_HINT.format(path=data_dir)
        )
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as error:  # corrupt tokenizer.json or config: name the directory
        raise DataError(
            f"cannot load the tokenizer in {str(tokenizer_dir)!r} ({error}); re-run "
            f"`modformer prepare {data_dir} --overwrite`"
        ) from error


class TokenDataset:
    """One split ("train" or "val") of a prepared data directory, optionally restricted to
    some domains.

    Args:
        data_dir: a directory written by `modformer prepare`.
        split: "train" or "val".
        domains: domain names to restrict sampling and iteration to; None means the whole
            split as one stream (windows may then cross domain boundaries, as they cross
            document boundaries).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        domains: Sequence[str] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.data_dir)
        split_info = self.meta["splits"][split]
        self.domain_ranges: dict[str, tuple[int, int]] = {
            name: (start, end) for name, (start, end) in split_info["domains"].items()
        }
        if domains is not None:
            if isinstance(domains, str):
                domains = [domains]
            if not domains:
                raise DataError("domains is empty; pass None to use the whole split")
            unknown = [name for name in domains if name not in self.domain_ranges]
            if unknown:
                raise DataError(
                    f"unknown domain(s) {unknown} for {str(self.data_dir)!r}; it has "
                    f"{', '.join(self.domain_ranges)}"
                )
        self._domains = tuple(domains) if domains is not None else tuple(self.domain_ranges)
        # Whole split as one range when unrestricted; otherwise one range per domain.
        if domains is None:
            self._ranges = [(0, split_info["tokens"])]
        else:
            self._ranges = [self.domain_ranges[name] for name in self._domains]
        self._data = self._open_tokens(split_info["tokens"])
        self._max_token_id: int | None = None

    def _open_tokens(self, num_tokens: int) -> np.memmap:
        path = self.data_dir / f"{self.split}.bin"
        if not path.is_file():
            raise DataError(
                f"{str(path)!r} is missing; "
                + _PREPARE_HINT.format(path=self.data_dir)
                + " (with --overwrite to replace the broken directory)"
            )
        dtype = np.dtype(self.meta["dtype"])
        expected_bytes = num_tokens * dtype.itemsize
        actual_bytes = path.stat().st_size
        if actual_bytes != expected_bytes:
            raise DataError(
                f"{str(path)!r} has {actual_bytes} bytes but meta.json says {num_tokens} "
                f"{dtype.name} tokens ({expected_bytes} bytes): the file is truncated or does not "
                f"belong to this meta.json; re-run `modformer prepare {self.data_dir} --overwrite`"
            )
        if num_tokens == 0:
            raise DataError(
                f"the {self.split} split of {str(self.data_dir)!r} has no tokens; prepare more "
                "data or a larger --val-fraction"
            )
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eos_token_id(self) -> int:
        return self.meta["eos_token_id"]

    @property
    def domains(self) -> tuple[str, ...]:
        """The domains this dataset samples from (all of the split's when unrestricted)."""
        return self._domains

    @property
    def num_tokens(self) -> int:
        """Tokens in the selected ranges."""
        return sum(end - start for start, end in self._ranges)

    @property
    def tokens(self) -> np.ndarray:
        """The selected tokens as one 1-D array, in split order: a read-only memmap view
        when they form one contiguous block (the whole split, one domain, adjacent
        domains), else the ranges concatenated into memory."""
        merged: list[list[int]] = []
        for start, end in sorted(self._ranges):
            if merged and merged[-1][1] == start:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        if len(merged) == 1:
            return self._data[merged[0][0] : merged[0][1]]
        return np.concatenate([self._data[start:end] for start, end in merged])

    @property
    def max_token_id(self) -> int:
        """The largest token id of the split (-1 when empty): from meta.json, or found by
        scanning the file for data prepared before meta.json recorded it."""
        recorded = self.meta["splits"][self.split].get("max_token_id")
        if recorded is None:
            if self._max_token_id is None:
                self._max_token_id = int(self._data.max()) if len(self._data) else -1
            return self._max_token_id
        return recorded

    def check_vocab_fits(self, model_vocab_size: int) -> None:
        """Raise if a token id of this data falls outside the model's embedding (or the
        data's own vocabulary), before any batch would hit an IndexError."""
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"the data in {str(self.data_dir)!r} has vocab_size {self.vocab_size} but the "
                f"model's vocab_size is {model_vocab_size}; build the model with vocab_size >= "
                f"{self.vocab_size} (e.g. from meta.json), or prepare the data with a smaller "
                "tokenizer"
            )
        max_id = self.max_token_id
        if max_id >= self.vocab_size:
            raise DataError(
                f"{str(self.data_dir / (self.split + '.bin'))!r} holds token id {max_id}, outside "
                f"its vocabulary of {self.vocab_size} (meta.json): the file is corrupt or does not "
                f"belong to this meta.json; re-run `modformer prepare {self.data_dir} --overwrite`"
            )

    def _window_starts(
        self, ranges: Sequence[tuple[int, int]], block_size: int
    ) -> list[tuple[int, int]]:
        """Per range: its first window start and how many windows of `block_size` fit."""
        if block_size <= 0:
            raise DataError(f"block_size must be positive, got {block_size}")
        usable = [(start, end - start - block_size + 1) for start, end in ranges]
        usable = [(start, count) for start, count in usable if count > 0]
        if not usable:
            longest = max(end - start for start, end in ranges)
            raise DataError(
                f"block_size {block_size} is longer than any selected range of the "
                f"{self.split} split of {str(self.data_dir)!r} (longest: {longest} tokens); "
                "use a smaller block_size or prepare more data"
            )
        return usable

    def _gather(self, starts: np.ndarray, block_size: int) -> torch.Tensor:
        windows = self._data[starts[:, None] + np.arange(block_size)]
        return torch.from_numpy(windows.astype(np.int64))

    def get_batch(
        self,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """`batch_size` random windows of `block_size` tokens, shape (B, block_size), int64.

        Window starts are uniform over every position of the selected ranges where a whole
        window fits, so each domain is drawn in proportion to its length and a window never
        crosses out of its domain. On a CUDA `device` the batch is copied from pinned memory
        without blocking.
        """
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        usable = self._window_starts(self._ranges, block_size)
        first_starts = torch.tensor([start for start, _ in usable], dtype=torch.int64)
        counts = torch.tensor([count for _, count in usable], dtype=torch.int64)
        offsets = torch.cumsum(counts, 0)
        draws = torch.randint(int(offsets[-1]), (batch_size,), generator=generator)
        range_index = torch.searchsorted(offsets, draws, right=True)
        starts = first_starts[range_index] + draws - (offsets[range_index] - counts[range_index])
        batch = self._gather(starts.numpy(), block_size)
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda":
                return batch.pin_memory().to(device, non_blocking=True)
            return batch.to(device)
        return batch

    def iter_sequential(
        self, block_size: int, batch_size: int, domain: str | None = None
    ) -> Iterator[torch.Tensor]:
        """Every non-overlapping window of `block_size` tokens, in order, in batches of up to
        `batch_size` (the last batch may be smaller).

        Covers the selected ranges (or just `domain`); windows stay inside one domain when
        domains are selected. The tail of a range shorter than `block_size` is not covered.
        """
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        usable = self._window_starts(self._ranges_of(domain), block_size)
        starts = np.concatenate(
            [
                start + block_size * np.arange((count - 1) // block_size + 1)
                for start, count in usable
            ]
        )
        for first in range(0, len(starts), batch_size):
            yield self._gather(starts[first : first + batch_size], block_size)

    def num_sequential_windows(self, block_size: int, domain: str | None = None) -> int:
        """How many windows `iter_sequential` yields (for progress bars and averaging)."""
        usable = self._window_starts(self._ranges_of(domain), block_size)
        return sum((count - 1) // block_size + 1 for _, count in usable)

    def _ranges_of(self, domain: str | None) -> list[tuple[int, int]]:
        if domain is None:
            return self._ranges
        if domain not in self.domain_ranges:
            raise DataError(
                f"unknown domain {domain!r} for {str(self.data_dir)!r}; it has "
                f"{', '.join(self.domain_ranges)}"
            )
        return [self.domain_ranges[domain]]

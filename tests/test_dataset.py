"""TokenDataset: reproducible, domain-restricted batches and sequential windows over the
token files `prepare` writes, and clear errors for broken data directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modformer.data import DataError, TokenDataset, load_tokenizer, prepare
from test_data import read_split

A_LETTERS, B_LETTERS = "abcdefghijklm", "nopqrstuvwxyz"


@pytest.fixture
def two_domain_dir(tmp_path) -> Path:
    """Byte-level data: domain `a` uses only letters a-m and is 3x longer than domain `b`,
    which uses only n-z; the letters vary with position so windows differ."""
    for name, letters, length in (("a", A_LETTERS, 3000), ("b", B_LETTERS, 1000)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(5):
            text = "".join(letters[(j * j + 7 * i) % len(letters)] for j in range(length))
            (folder / f"{i}.txt").write_text(text)
    out = tmp_path / "data"
    prepare(
        out,
        inputs=[f"a={tmp_path / 'a'}", f"b={tmp_path / 'b' / '*.txt'}"],
        tokenizer="byte",
        val_fraction=0.2,
        progress=False,
    )
    return out


def letter_ids(letters: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in letters])


def test_get_batch_is_reproducible_and_domain_restricted(two_domain_dir):
    dataset = TokenDataset(two_domain_dir, "train", domains=["b"])
    assert dataset.domains == ("b",)
    batch = dataset.get_batch(16, 64, torch.Generator().manual_seed(3))
    assert batch.shape == (16, 64) and batch.dtype == torch.int64
    assert torch.equal(batch, dataset.get_batch(16, 64, torch.Generator().manual_seed(3)))
    fresh = TokenDataset(two_domain_dir, "train", ["b"])
    assert torch.equal(batch, fresh.get_batch(16, 64, torch.Generator().manual_seed(3)))
    assert not torch.equal(batch, dataset.get_batch(16, 64, torch.Generator().manual_seed(4)))
    on_device = dataset.get_batch(16, 64, torch.Generator().manual_seed(3), device="cpu")
    assert torch.equal(batch, on_device)
    # Every window is a contiguous slice of domain b's tokens.
    start, end = dataset.domain_ranges["b"]
    domain_tokens = read_split(two_domain_dir, "train")[start:end].astype(np.int64)
    assert torch.isin(batch, torch.cat([letter_ids(B_LETTERS), torch.tensor([256])])).all()
    for row in batch.numpy():
        assert row.tobytes() in domain_tokens.tobytes()
    # Restricted to b, the batch differs from the unrestricted one with the same seed.
    everything = TokenDataset(two_domain_dir, "train")
    assert not torch.equal(batch, everything.get_batch(16, 64, torch.Generator().manual_seed(3)))


def test_tokens_view_of_selected_domains(two_domain_dir):
    full = read_split(two_domain_dir, "train")
    dataset = TokenDataset(two_domain_dir, "train")
    assert isinstance(dataset.tokens, np.memmap) and np.array_equal(dataset.tokens, full)
    b_only = TokenDataset(two_domain_dir, "train", domains=["b"])
    start, end = b_only.domain_ranges["b"]
    assert np.array_equal(b_only.tokens, full[start:end])
    both = TokenDataset(two_domain_dir, "train", domains=["b", "a"])  # adjacent: one view
    assert isinstance(both.tokens, np.memmap) and np.array_equal(both.tokens, full)
    assert both.num_tokens == len(full)


def test_get_batch_samples_domains_in_proportion_to_length(two_domain_dir):
    dataset = TokenDataset(two_domain_dir, "train", domains=["a", "b"])
    batch = dataset.get_batch(4000, 16, torch.Generator().manual_seed(0))
    from_a = torch.isin(batch, letter_ids(A_LETTERS)).any(dim=1)
    from_b = torch.isin(batch, letter_ids(B_LETTERS)).any(dim=1)
    assert not (from_a & from_b).any()  # a window never crosses out of its domain
    (a_start, a_end), (b_start, b_end) = dataset.domain_ranges["a"], dataset.domain_ranges["b"]
    expected = (a_end - a_start - 15) / (a_end - a_start - 15 + b_end - b_start - 15)
    assert abs(from_a.float().mean().item() - expected) < 0.03  # ~4 standard deviations


def test_iter_sequential_covers_split_in_order(two_domain_dir):
    dataset = TokenDataset(two_domain_dir, "val")
    tokens = torch.from_numpy(read_split(two_domain_dir, "val").astype(np.int64))
    windows = torch.cat(list(dataset.iter_sequential(block_size=100, batch_size=7)))
    assert windows.shape == (len(tokens) // 100, 100)
    assert dataset.num_sequential_windows(100) == len(windows)
    assert torch.equal(windows.flatten(), tokens[: windows.numel()])
    start, end = dataset.domain_ranges["b"]
    b_windows = torch.cat(list(dataset.iter_sequential(50, 4, domain="b")))
    assert torch.equal(b_windows.flatten(), tokens[start : start + (end - start) // 50 * 50])


def test_dataset_reports_broken_directories(tmp_path, two_domain_dir):
    with pytest.raises(DataError, match="does not exist.*modformer prepare"):
        TokenDataset(tmp_path / "nowhere")
    dataset = TokenDataset(two_domain_dir)
    with pytest.raises(DataError, match="vocab_size 257.*model's vocab_size is 100"):
        dataset.check_vocab_fits(100)
    dataset.check_vocab_fits(257)
    with pytest.raises(DataError, match="unknown domain"):
        TokenDataset(two_domain_dir, domains=["c"])
    with pytest.raises(DataError, match="domains is empty"):
        TokenDataset(two_domain_dir, domains=[])
    with pytest.raises(DataError, match="split must be one of"):
        TokenDataset(two_domain_dir, "test")
    with pytest.raises(DataError, match="block_size 100000 is longer"):
        dataset.get_batch(2, 100_000, torch.Generator())

    val_bin = two_domain_dir / "val.bin"
    val_bin.write_bytes(val_bin.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(two_domain_dir, "val")
    (two_domain_dir / "tokenizer" / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        load_tokenizer(two_domain_dir)
    meta_path = two_domain_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["splits"]["train"]["domains"]["b"][1] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not a valid range"):
        TokenDataset(two_domain_dir, "train")
    meta_path.write_text('{"format_version": 1, "dtype"')
    with pytest.raises(DataError, match="corrupt"):
        TokenDataset(two_domain_dir, "train")
    meta_path.unlink()
    with pytest.raises(DataError, match="meta.json' is missing.*modformer prepare"):
        TokenDataset(two_domain_dir, "train")

"""`modformer prepare`: turn a corpus into the token files the trainer and evaluation read.

Output directory (format version 1)::

    train.bin, val.bin   flat token streams (np.memmap-able), uint16 when vocab_size <= 65536
                         else uint32; every document is followed by the eos token
    meta.json            dtype, vocab_size, eos_token_id, tokenizer, seed, val_fraction,
                         sources, per-split token counts, largest token id and domain
                         ranges, per-domain
                         counts, skipped inputs, creation time
    tokenizer/           loadable with `transformers.PreTrainedTokenizerFast.from_pretrained`

Within each split the tokens of a domain are contiguous: ``meta["splits"][split]["domains"]
[name] == [start, end)`` so training can sample from, and evaluation can score, one domain.

The train/val split is by document: in each domain, documents drawn in a seeded order
join validation while they keep it within `val_fraction` of the domain's bytes, with at
least one validation document in every domain of two or more documents. A domain of a
single document is split by token position instead (its last `val_fraction` of tokens).

Everything is written into a temporary directory beside the destination and renamed into
place at the end, so a crash never leaves a half-written directory behind; `meta.json` is
the last file written, and `TokenDataset` refuses a directory without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from modformer.data.corpus import (
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    USER_SUFFIXES,
    Corpus,
    DataError,
    build_corpus,
)
from modformer.data.tokenizer import (
    PreparedTokenizer,
    byte_tokenizer,
    check_bpe_vocab_size,
    load_hf_tokenizer,
    token_dtype,
    tokenizer_kind,
    train_bpe_tokenizer,
)
from modformer.utils import check_output_path, make_temp_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 1234
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
# Documents handed to the (multi-threaded) tokenizer at once.
ENCODE_BATCH_DOCUMENTS = 256


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction <= 0.5:
        raise DataError(
            f"val_fraction must be in (0, 0.5], got {val_fraction}; "
            f"{DEFAULT_VAL_FRACTION} is a good default"
        )


def validation_documents(
    document_sizes: Sequence[int], val_fraction: float, seed: int, domain: str
) -> np.ndarray:
    """Boolean mask of the documents of one domain that go to the validation split.

    Documents are visited in a permutation seeded with (seed, domain name), and each one
    that still fits joins validation while the validation share of the domain's bytes
    stays within `val_fraction`. Aiming at a share of the text rather than of the
    documents keeps one huge file from making the split lopsided. At least one document
    goes to validation (the smallest, if none fits) and never all of them. The same
    inputs give the same split, and adding a domain does not reshuffle the others.
    """
    sizes = np.asarray(document_sizes, dtype=np.int64)
    is_val = np.zeros(len(sizes), dtype=bool)
    if len(sizes) < 2:
        return is_val
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    order = rng.permutation(len(sizes))
    budget = val_fraction * sizes.sum()
    val_bytes = 0
    for index in order:
        if val_bytes + sizes[index] <= budget:
            is_val[index] = True
            val_bytes += sizes[index]
    if not is_val.any():
        # `order` breaks ties between equally small documents at random too.
        is_val[order[np.argmin(sizes[order])]] = True
    return is_val


def position_split(num_tokens: int, val_fraction: float) -> int:
    """Where a single-document domain is cut: tokens before go to train, after to val.
    At least one token on each side when the document has two or more."""
    if num_tokens < 2:
        return num_tokens
    num_val = min(num_tokens - 1, max(1, round(val_fraction * num_tokens)))
    return num_tokens - num_val


class _TokenFile:
    """Appends token arrays to a `.bin` file and knows its length in tokens."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.num_tokens = 0
        self.max_token_id = -1  # recorded in meta.json: readers check it against the model
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in `close`)

    def write(self, token_ids: np.ndarray) -> None:
        self._file.write(token_ids.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += len(token_ids)
        if len(token_ids):
            self.max_token_id = max(self.max_token_id, int(token_ids.max()))

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the directory is renamed into place
        self._file.close()


def _with_eos(token_ids: list[int], eos_token_id: int) -> np.ndarray:
    array = np.empty(len(token_ids) + 1, dtype=np.int64)
    array[:-1] = token_ids
    array[-1] = eos_token_id
    return array


def _write_documents(
    documents: list[str],
    tokenizer: PreparedTokenizer,
    out: _TokenFile,
    progress_bar: tqdm,
) -> None:
    for start in range(0, len(documents), ENCODE_BATCH_DOCUMENTS):
        batch = documents[start : start + ENCODE_BATCH_DOCUMENTS]
        ids = tokenizer.encode_batch(batch)
        out.write(np.concatenate([_with_eos(doc_ids, tokenizer.eos_token_id) for doc_ids in ids]))
        progress_bar.update(len(batch))


def _write_corpus(
    corpus: Corpus,
    tokenizer: PreparedTokenizer,
    directory: Path,
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tokenize every domain into `train.bin` / `val.bin`; return (splits, domains) meta."""
    files = {split: _TokenFile(directory / f"{split}.bin", dtype) for split in SPLITS}
    ranges: dict[str, dict[str, list[int]]] = {split: {} for split in SPLITS}
    domain_stats: dict[str, Any] = {}
    total_documents = sum(len(d.documents) for d in corpus.domains.values())
    progress_bar = tqdm(total=total_documents, desc="tokenizing", unit="doc", disable=not progress)
    try:
        for name, domain in corpus.domains.items():
            starts = {split: files[split].num_tokens for split in SPLITS}
            if len(domain.documents) == 1:
                split_by = "position"
                (ids,) = tokenizer.encode_batch(domain.documents)
                cut = position_split(len(ids), val_fraction)
                files["train"].write(_with_eos(ids[:cut], tokenizer.eos_token_id))
                if cut < len(ids):
                    files["val"].write(_with_eos(ids[cut:], tokenizer.eos_token_id))
                num_val_documents = 0
                progress_bar.update(1)
            else:
                split_by = "documents"
                sizes = [len(doc.encode("utf-8")) for doc in domain.documents]
                is_val = validation_documents(sizes, val_fraction, seed, name)
                for split, in_split in (("train", ~is_val), ("val", is_val)):
                    documents = [doc for doc, keep in zip(domain.documents, in_split) if keep]
                    _write_documents(documents, tokenizer, files[split], progress_bar)
                num_val_documents = int(is_val.sum())
            for split in SPLITS:
                ranges[split][name] = [starts[split], files[split].num_tokens]
            train_tokens = files["train"].num_tokens - starts["train"]
            val_tokens = files["val"].num_tokens - starts["val"]
            if val_tokens == 0:
                logger.warning("domain %r is too small to give validation tokens", name)
            domain_stats[name] = {
                "documents": len(domain.documents),
                "train_documents": len(domain.documents) - num_val_documents,
                "val_documents": num_val_documents,
                "bytes": domain.num_bytes,
                "split_by": split_by,
                "train_tokens": train_tokens,
                "val_tokens": val_tokens,
            }
    finally:
        progress_bar.close()
        for file in files.values():
            file.close()
    splits = {
        split: {
            "tokens": files[split].num_tokens,
            "max_token_id": files[split].max_token_id,
            "domains": ranges[split],
        }
        for split in SPLITS
    }
    return splits, domain_stats


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    with open(directory / META_FILE, "w", encoding="utf-8") as file:
        json.dump(meta, file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())


def _check_destination(output_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber: a non-empty directory is replaced only with `overwrite`, and only
    if it is a previous `prepare` output (has meta.json), never some other directory."""
    check_output_path(output_dir, "output directory", directory=True)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise DataError(f"output path {str(output_dir)!r} exists and is not a directory")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"output directory {str(output_dir)!r} already exists and is not empty; pass "
            "--overwrite (overwrite=True) to replace it, or choose another directory"
        )
    if not (output_dir / META_FILE).is_file():
        raise DataError(
            f"output directory {str(output_dir)!r} is not empty and has no {META_FILE}, so it "
            "is not a previous `modformer prepare` output; refusing to delete it even with "
            "--overwrite. Choose another directory or empty it yourself"
        )


def _publish(staging_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Move the finished staging directory to `output_dir` with renames only."""
    _check_destination(output_dir, overwrite)  # again: something may have appeared meanwhile
    if output_dir.exists() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    if output_dir.exists():
        # Rename the old data aside first so there is never a moment with a mixed directory.
        old_dir = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        output_dir.rename(old_dir)
        staging_dir.rename(output_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        staging_dir.rename(output_dir)


def _make_tokenizer(
    kind: str, spec: str, corpus: Corpus, vocab_size: int, progress: bool
) -> PreparedTokenizer:
    if kind == "bpe":
        logger.info("training a byte-level BPE with vocab_size=%d", vocab_size)
        return train_bpe_tokenizer(corpus.texts(), vocab_size, progress=progress)
    if kind == "byte":
        return byte_tokenizer()
    return load_hf_tokenizer(spec)


def prepare(
    output_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | None = None,
    domains: Sequence[str] | None = None,
    tokenizer: str | os.PathLike = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    text_field: str = "text",
    overwrite: bool = False,
    domain: str | None = None,
    include_python_tests: bool = False,
    progress: bool = True,
    suffixes: Sequence[str] = USER_SUFFIXES,
) -> dict[str, Any]:
    """Tokenize a corpus into `output_dir` (see the module docstring for the format).

    Args:
        output_dir: directory to create; must not exist or be empty unless `overwrite`.
        inputs: user files: paths, globs, directories or `NAME=PATH_OR_GLOB`; None uses
            the built-in corpus.
        domains: built-in domains to include (`python`, `prose`, `c`); None means all of
            them when `inputs` is None, none otherwise.
        tokenizer: "bpe" (train a byte-level BPE here), "byte" (raw UTF-8 bytes), or a
            local Hugging Face tokenizer directory or tokenizer.json file.
        vocab_size: BPE vocabulary size, end-of-text token included (bpe only).
        val_fraction: share of each domain's text held out for validation, in (0, 0.5]
            (whole documents; a single-document domain is split by position).
        seed: seeds the train/val split (BPE training is deterministic by itself).
        max_bytes_per_domain: cap on the UTF-8 bytes read for each built-in domain.
        text_field: JSON field holding the text in `.jsonl` inputs.
        overwrite: replace an existing output directory of a previous `prepare`.
        domain: domain name for inputs given without `NAME=`.
        include_python_tests: include the standard library's test suites in `python`.
        progress: show progress bars.
        suffixes: file endings a directory input contributes (default `.txt`, `.jsonl`).

    Returns:
        The metadata written to `meta.json`.
    """
    output_dir = Path(output_dir)
    # Cheap checks first, so a typo fails before minutes of reading and training.
    check_val_fraction(val_fraction)
    kind = tokenizer_kind(tokenizer)
    if kind == "bpe":
        check_bpe_vocab_size(vocab_size)
    _check_destination(output_dir, overwrite)

    corpus = build_corpus(
        inputs,
        domains=domains,
        domain=domain,
        max_bytes_per_domain=max_bytes_per_domain,
        include_python_tests=include_python_tests,
        text_field=text_field,
        suffixes=suffixes,
    )
    for name, corpus_domain in corpus.domains.items():
        logger.info(
            "domain %r: %d documents, %d bytes",
            name,
            len(corpus_domain.documents),
            corpus_domain.num_bytes,
        )
    prepared = _make_tokenizer(kind, os.fspath(tokenizer), corpus, vocab_size, progress)
    dtype = token_dtype(prepared.vocab_size)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = make_temp_dir(output_dir.parent, prefix=f".{output_dir.name}.tmp-")
    try:
        prepared.save(staging_dir / TOKENIZER_DIR)
        splits, domain_stats = _write_corpus(
            corpus, prepared, staging_dir, dtype, val_fraction, seed, progress
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": prepared.vocab_size,
            "eos_token_id": prepared.eos_token_id,
            "tokenizer": {"kind": prepared.kind, "source": prepared.source, "path": TOKENIZER_DIR},
            "seed": seed,
            "val_fraction": val_fraction,
            "max_bytes_per_domain": max_bytes_per_domain,
            "text_field": text_field,
            "sources": [source for d in corpus.domains.values() for source in d.sources],
            "splits": splits,
            "domains": domain_stats,
            "skipped": corpus.skipped,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_meta(staging_dir, meta)
        _publish(staging_dir, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    logger.info("wrote %s", output_dir)
    return meta

"""Tokenizers for `modformer prepare`: a trained byte-level BPE, a local Hugging Face
tokenizer, or raw UTF-8 bytes.

Whatever the kind, the result is a `transformers.PreTrainedTokenizerFast` with an
end-of-text token (the document separator in the token streams, and eos/bos/pad for
generation), saved as `<data_dir>/tokenizer/` so generation and evaluation decode with
exactly the tokenizer the data was made with. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modformer.data.corpus import DataError

if TYPE_CHECKING:  # transformers imports torch: only when a tokenizer is made
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# A byte-level BPE starts from all 256 byte symbols plus the end-of-text token.
MIN_BPE_VOCAB_SIZE = 257
# End-of-text tokens of common tokenizers, tried in order when a loaded tokenizer's
# config does not name its eos token.
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class PreparedTokenizer:
    """A tokenizer ready to encode a corpus: the HF wrapper plus what `meta.json` records."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, kind: str, source: str) -> None:
        self.tokenizer = tokenizer
        self.kind = kind  # "bpe" | "byte" | "hf"
        self.source = source  # "corpus" (trained here), "utf-8 bytes", or the loaded path
        # A private copy that encodes special-token strings as plain text (see
        # `encode_batch`), so the saved tokenizer keeps its normal behaviour.
        self._encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._encoder.encode_special_tokens = True

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id (added tokens included): the size a model's
        embedding needs, which can exceed the number of tokens if ids have gaps."""
        vocab = self.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        return max(vocab.values()) + 1

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with no special tokens added and none recognised: a
        document that contains the literal string "<|endoftext|>" is encoded as text, so
        the eos id only ever appears where `prepare` puts it, between documents."""
        encodings = self._encoder.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id: uint16 up to 65536 tokens."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def tokenizer_kind(spec: str | os.PathLike) -> str:
    """ "bpe", "byte" or "hf" (a local path); anything else is a clear error."""
    spec = os.fspath(spec)
    if spec in ("bpe", "byte"):
        return spec
    if os.path.exists(spec):
        return "hf"
    raise DataError(
        f"tokenizer {spec!r} is neither 'bpe', 'byte' nor an existing path; give 'bpe' to "
        "train one, 'byte' for raw bytes, or a local directory / tokenizer.json of a "
        "Hugging Face tokenizer (nothing is downloaded)"
    )


def check_bpe_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE needs room for the 256 bytes and the end-of-text token."""
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{MIN_BPE_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}); use a larger --vocab-size "
            "or --tokenizer byte"
        )


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    # GPT-2 convention: one token ends documents, starts generation, and pads batches.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, progress: bool = False
) -> PreparedTokenizer:
    """Train a GPT-2-style byte-level BPE on `texts`.

    Every byte is in the initial alphabet, so any text encodes without unknown tokens.
    The trainer breaks ties between equally frequent pairs deterministically, so the same
    texts in the same order give the same tokenizer in every run.
    """
    check_bpe_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreparedTokenizer(_wrap(tokenizer), kind="bpe", source="corpus")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def byte_tokenizer() -> PreparedTokenizer:
    """Token id = UTF-8 byte value (0..255), plus the end-of-text token as id 256.

    Built as a byte-level BPE without merges so it loads and decodes like any other HF
    tokenizer.
    """
    vocab = {symbol: byte for byte, symbol in _byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges the pre-tokens do not matter, and this is faster.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    return PreparedTokenizer(_wrap(tokenizer), kind="byte", source="utf-8 bytes")


def _gpt2_files_tokenizer(directory: Path) -> Tokenizer:
    """A byte-level BPE from GPT-2's `vocab.json` + `merges.txt` (no tokenizer.json)."""
    with open(directory / "vocab.json", encoding="utf-8") as file:
        vocab = json.load(file)
    merges = []
    with open(directory / "merges.txt", encoding="utf-8") as file:
        for line in file:
            if line.startswith("#version") or not line.strip():
                continue
            left, right = line.rstrip("\n").split(" ")
            merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if EOS_TOKEN in vocab:
        tokenizer.add_special_tokens([EOS_TOKEN])
    return tokenizer


def load_hf_tokenizer(path: str | os.PathLike) -> PreparedTokenizer:
    """Load a local Hugging Face tokenizer: a directory with `tokenizer.json` (and usually
    `tokenizer_config.json`), a directory with GPT-2's `vocab.json` + `merges.txt`, or a
    `tokenizer.json` file. Its eos token becomes the document separator; pad defaults
    to eos."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer path {str(path)!r} does not exist")
    try:
        if path.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif (path / "tokenizer.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=_gpt2_files_tokenizer(path))
        else:
            raise DataError(
                f"tokenizer directory {str(path)!r} has no tokenizer.json (nor GPT-2's "
                "vocab.json + merges.txt); point --tokenizer at a Hugging Face tokenizer "
                "directory saved with save_pretrained, or at a tokenizer.json file"
            )
    except DataError:
        raise
    except Exception as error:  # corrupt JSON, unknown model type, ...: say which file
        raise DataError(f"cannot load the tokenizer at {str(path)!r}: {error}") from error

    if tokenizer.eos_token is None:
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        candidates = [token for token in KNOWN_EOS_TOKENS if token in vocab]
        if not candidates:
            raise DataError(
                f"the tokenizer at {str(path)!r} has no end-of-text token (no eos_token in its "
                f"config and none of {', '.join(KNOWN_EOS_TOKENS)} in its vocabulary); set "
                "eos_token in its tokenizer_config.json, or use --tokenizer bpe"
            )
        tokenizer.eos_token = candidates[0]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PreparedTokenizer(tokenizer, kind="hf", source=str(path.resolve()))

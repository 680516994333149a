"""Data pipeline: `modformer prepare` (corpus -> tokenizer -> token files) and the readers
the trainer and evaluation use. The readers import torch, so they are imported on first
use (see modformer._lazy): `modformer prepare --help` stays quick."""

from typing import TYPE_CHECKING

from modformer._lazy import lazy_exports
from modformer.data.corpus import BUILTIN_DOMAINS, DataError, build_corpus
from modformer.data.prepare import prepare
from modformer.data.tokenizer import token_dtype

_LAZY = {name: "modformer.data.dataset" for name in ("TokenDataset", "load_tokenizer", "read_meta")}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

if TYPE_CHECKING:
    from modformer.data.dataset import TokenDataset, load_tokenizer, read_meta

__all__ = [
    "BUILTIN_DOMAINS",
    "DataError",
    "TokenDataset",
    "build_corpus",
    "load_tokenizer",
    "prepare",
    "read_meta",
    "token_dtype",
]

"""Data pipeline: `modformer prepare` (corpus -> tokenizer -> token files) and the readers
the trainer and evaluation use."""

from modformer.data.corpus import BUILTIN_DOMAINS, DataError, build_corpus
from modformer.data.dataset import TokenDataset, load_tokenizer, read_meta
from modformer.data.prepare import add_prepare_arguments, prepare, run_prepare
from modformer.data.tokenizer import token_dtype

__all__ = [
    "BUILTIN_DOMAINS",
    "DataError",
    "TokenDataset",
    "add_prepare_arguments",
    "build_corpus",
    "load_tokenizer",
    "prepare",
    "read_meta",
    "run_prepare",
    "token_dtype",
]

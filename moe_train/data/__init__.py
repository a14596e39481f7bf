"""Token data: memmap token files, byte tokenizer, default corpus, pure-function sampling."""

from .config import DataConfig, open_splits, resolve_data_dir
from .default_corpus import default_cache_dir, default_corpus_dir
from .prepare import prepare_corpus, prepare_documents
from .sampler import get_batch, num_val_batches, rank_share, sample_offsets, val_batches
from .tokenizers import ByteTokenizer
from .tokens import DataError, TokenFile, TokenWriter, dtype_for_vocab, write_tokens

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "TokenFile",
    "TokenWriter",
    "default_cache_dir",
    "default_corpus_dir",
    "dtype_for_vocab",
    "get_batch",
    "num_val_batches",
    "open_splits",
    "prepare_corpus",
    "prepare_documents",
    "rank_share",
    "resolve_data_dir",
    "sample_offsets",
    "val_batches",
    "write_tokens",
]

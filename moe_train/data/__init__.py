"""Token data: corpora readers and the sharded writer (moe-train-prepare), token files (flat,
shards, Megatron), sources and mixtures, pure-function sampling, the default corpus."""

from .config import DataConfig, MixSource, TrainingData, open_data, resolve_data_dir
from .default_corpus import default_cache_dir, default_corpus_dir
from .documents import document_ids, document_lengths
from .megatron import IndexedTokens, IndexedWriter
from .prepare import prepare_corpus, prepare_documents
from .sampler import (
    BatchSampler,
    get_batch,
    num_val_batches,
    rank_share,
    sample_offsets,
    val_batches,
)
from .sources import Source, open_source, open_splits
from .streams import TokenStream
from .tokenizers import ByteTokenizer
from .tokens import DataError, TokenFile, TokenWriter, dtype_for_vocab, write_tokens

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "IndexedTokens",
    "IndexedWriter",
    "MixSource",
    "Source",
    "TokenFile",
    "TokenStream",
    "TokenWriter",
    "TrainingData",
    "default_cache_dir",
    "default_corpus_dir",
    "document_ids",
    "document_lengths",
    "dtype_for_vocab",
    "get_batch",
    "num_val_batches",
    "open_data",
    "open_source",
    "open_splits",
    "prepare_corpus",
    "prepare_documents",
    "rank_share",
    "resolve_data_dir",
    "sample_offsets",
    "val_batches",
    "write_tokens",
]

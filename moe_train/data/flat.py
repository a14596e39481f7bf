"""Flat `train.bin`/`val.bin` (+ `.json` sidecars, moe_train/data/tokens.py) from a list of text
files: the format of the embedded default corpus and of earlier `moe-train-prepare` versions
(which training still reads). `moe-train-prepare` itself writes sharded folders (pipeline.py).

Each file is one document followed by the end-of-document token; files are streamed in chunks
(memory stays flat). A single document is split by position: its tail becomes val.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .pipeline import pieces_of, split_documents
from .readers import BINARY_SNIFF
from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, train_bpe
from .tokens import DataError, TokenWriter

CHUNK_BYTES = 16 << 20
DEFAULT_BPE_VOCAB = 4096
_ENCODE_PIECE = 1 << 20  # characters per piece handed to a BPE tokenizer's parallel encode


def make_tokenizer(
    spec: str | Tokenizer, vocab_size: int | None, texts: Callable[[], Iterable[str]]
) -> Tokenizer:
    """`bytes`, `bpe` (trained on texts(), vocab_size entries) or a tokenizer.json path/folder."""
    if not isinstance(spec, str):
        return spec
    if vocab_size is not None and spec != "bpe":
        raise DataError(f"--vocab-size applies to --tokenizer bpe, not {spec!r}")
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "bpe":
        return train_bpe(texts(), vocab_size or DEFAULT_BPE_VOCAB)
    return HFTokenizer.from_file(spec)


@dataclass(frozen=True)
class Document:
    key: str  # path relative to its input, '/'-separated: what the split hashes
    path: Path


@dataclass
class FlatResult:
    out_dir: Path
    train_docs: int = 0
    val_docs: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    skipped: list[Path] = field(default_factory=list)  # binary files
    tokenizer: str = "bytes"
    vocab_size: int = 256


def _read_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The file in chunks of about chunk_bytes, each cut after its last newline when it has one."""
    rest = b""
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest, block = (block[cut:], block[:cut]) if cut else (b"", block)
            if block:
                yield block
    if rest:
        yield rest


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF)


def _to_tokens(chunk: bytes) -> np.ndarray:
    """bytes -> [n] uint16 ids, NUL bytes dropped (0 is the end-of-document token)."""
    arr = np.frombuffer(chunk, dtype=np.uint8)
    if not arr.all():
        arr = arr[arr != 0]
    return arr.astype(np.uint16)


def _char_boundary(chunk: bytes, i: int) -> int:
    """The first index >= i that does not cut a UTF-8 character."""
    while i < len(chunk) and chunk[i] & 0xC0 == 0x80:
        i += 1
    return i


def _encoder(tok: Tokenizer) -> Callable[[bytes], np.ndarray]:
    """chunk of UTF-8 bytes -> [n] ids, NUL bytes dropped (they never reach the tokenizer)."""
    if isinstance(tok, ByteTokenizer):
        return _to_tokens

    def encode(chunk: bytes) -> np.ndarray:
        text = chunk.replace(b"\0", b"").decode("utf-8", errors="replace")
        pieces = pieces_of(text, _ENCODE_PIECE)
        ids = tok.encode_batch(pieces) if pieces else []  # type: ignore[attr-defined]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    return encode


def _text_docs(docs: Sequence[Document], is_val: Sequence[bool] | None, result: FlatResult):
    """(non-empty text documents, their is_val flags); binary files go to result.skipped."""
    text_docs, flags = [], []
    for d, v in zip(docs, is_val or [False] * len(docs)):
        if d.path.stat().st_size > 0:
            if _looks_binary(d.path):
                result.skipped.append(d.path)
            else:
                text_docs.append(d)
                flags.append(v)
    if not text_docs:
        raise DataError(
            f"no non-empty text files among {len(docs)} inputs "
            f"(e.g. {docs[0].path if docs else 'none'}); nothing to prepare"
        )
    return text_docs, flags


def _train_texts(text_docs: list[Document], flags: list[bool], cut: int, chunk_bytes: int):
    """The training split's text (what a BPE is trained on), chunk by chunk."""
    if len(text_docs) == 1:
        pos = 0
        for chunk in _read_chunks(text_docs[0].path, chunk_bytes):
            head = _char_boundary(chunk, max(0, min(len(chunk), cut - pos)))
            pos += len(chunk)
            if head:
                yield chunk[:head].replace(b"\0", b"").decode("utf-8", errors="replace")
        return
    for d, v in zip(text_docs, flags):
        if not v:
            for chunk in _read_chunks(d.path, chunk_bytes):
                yield chunk.replace(b"\0", b"").decode("utf-8", errors="replace")


def prepare_documents(
    docs: Sequence[Document],
    out_dir: str | os.PathLike[str],
    val_fraction: float = 0.05,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    is_val: Sequence[bool] | None = None,
    tokenizer: str | Tokenizer = "bytes",
    vocab_size: int | None = None,
) -> FlatResult:
    """Tokenize `docs` (in the given order) into `out_dir/{train,val}.{bin,json}`.

    The split is `split_documents` of the keys unless `is_val` (one flag per doc) is given.
    `tokenizer`: as `make_tokenizer` takes it. Empty files are ignored;
    binary files are skipped and listed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    result = FlatResult(out_dir=out)
    if is_val is not None and len(is_val) != len(docs):
        raise ValueError(f"is_val has {len(is_val)} flags for {len(docs)} documents")
    text_docs, flags = _text_docs(docs, is_val, result)
    sizes = [d.path.stat().st_size for d in text_docs]
    if is_val is None:
        flags = split_documents([d.key for d in text_docs], val_fraction)
    cut = sizes[0] - max(1, round(sizes[0] * val_fraction))  # a single document's split point
    texts: Callable[[], Iterable[str]] = lambda: _train_texts(text_docs, flags, cut, chunk_bytes)  # noqa: E731
    tok = make_tokenizer(tokenizer, vocab_size, texts)
    tok.save(out)
    result.tokenizer, result.vocab_size = tok.name, tok.vocab_size
    with ExitStack() as stack:
        train = stack.enter_context(TokenWriter(out / "train.bin", tok.vocab_size, tok.name))
        val = stack.enter_context(TokenWriter(out / "val.bin", tok.vocab_size, tok.name))
        bar = stack.enter_context(
            tqdm(
                total=sum(sizes),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="tokenizing",
                disable=not progress,
            )  # fmt: skip
        )
        _write_splits(text_docs, flags, cut, chunk_bytes, tok, train, val, bar, result)
    result.train_tokens, result.val_tokens = train.num_tokens, val.num_tokens
    return result


def _write_splits(text_docs, flags, cut, chunk_bytes, tok, train, val, bar, result) -> None:
    """Every document's tokens and an end-of-document token into train or val."""
    encode, eot = _encoder(tok), np.array([tok.eot_id], dtype=np.int64)
    exact = isinstance(tok, ByteTokenizer)  # bytes split anywhere; text at a character boundary
    if len(text_docs) == 1:
        pos = 0
        for chunk in _read_chunks(text_docs[0].path, chunk_bytes):
            head = max(0, min(len(chunk), cut - pos))
            head = head if exact else _char_boundary(chunk, head)
            train.write(encode(chunk[:head]))
            val.write(encode(chunk[head:]))
            pos += len(chunk)
            bar.update(len(chunk))
        train.write(eot)
        val.write(eot)
        result.train_docs = result.val_docs = 1
        return
    for d, v in zip(text_docs, flags):
        w = val if v else train
        for chunk in _read_chunks(d.path, chunk_bytes):
            w.write(encode(chunk))
            bar.update(len(chunk))
        w.write(eot)
        result.val_docs += v
        result.train_docs += not v

"""`moe-train-prepare`: text files -> `train.bin`/`val.bin` token files (+ `tokenizer.json`).

Tokenizers: `bytes` (built in, vocab 256), `bpe` (a byte-level BPE trained here on the train split
with the Hugging Face `tokenizers` library, offline) or the path of an existing `tokenizer.json`.

Each input file is one document. Files are streamed in chunks (memory stays flat for any corpus
size). The train/val split is by document and decided by a hash of the document's path relative
to its input (the folder, the glob's fixed prefix, or the file's own folder), so it does not depend
on where the corpus lives, and adding files never moves existing ones between splits.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, train_bpe
from .tokens import DataError, TokenWriter

DEFAULT_VAL_FRACTION = 0.05
CHUNK_BYTES = 16 << 20
_BINARY_SNIFF = 8192  # a NUL byte in a file's first 8 KiB marks it as binary: skipped
_GLOB_MAGIC = set("*?[")
_ENCODE_PIECE = 1 << 20  # characters per piece handed to a BPE tokenizer's parallel encode
DEFAULT_BPE_VOCAB = 4096


@dataclass(frozen=True)
class Document:
    key: str  # path relative to its input, '/'-separated: what the split hashes
    path: Path


@dataclass
class PrepareResult:
    out_dir: Path
    train_docs: int = 0
    val_docs: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    skipped: list[Path] = field(default_factory=list)  # binary files
    tokenizer: str = "bytes"  # what the sidecars name: bytes or tokenizer.json
    vocab_size: int = 256


def _is_hidden(rel: Path) -> bool:
    return any(p.startswith(".") for p in rel.parts)


def _walk(root: Path, base: Path) -> Iterator[Document]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                p = Path(dirpath) / name
                yield Document(p.relative_to(base).as_posix(), p)


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: `data/**/*.txt` -> `data`."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_MAGIC & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def collect_documents(
    inputs: Sequence[str], extensions: Sequence[str] | None = None
) -> list[Document]:
    """Expand files, folders (recursive, hidden entries skipped) and globs into documents sorted
    by key. `extensions` (e.g. ['.txt', '.py']) keeps only files with those suffixes."""
    docs: dict[Path, Document] = {}
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found: Iterator[Document] = iter([Document(path.name, path)])
        elif path.is_dir():
            found = _walk(path, path)
        elif _GLOB_MAGIC & set(item):
            base = _glob_base(item)
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"input glob {item!r} matches no files; check the pattern")
            found = iter(
                d
                for m in matches
                for d in (
                    [Document(Path(m).relative_to(base).as_posix(), Path(m))]
                    if Path(m).is_file()
                    else _walk(Path(m), base)
                )
                if not _is_hidden(Path(d.key))
            )
        else:
            raise DataError(f"input {item!r} does not exist (expected a file, a folder or a glob)")
        for d in found:
            if extensions and d.path.suffix not in extensions:
                continue
            docs.setdefault(d.path.resolve(), d)
    return sorted(docs.values(), key=lambda d: (d.key, str(d.path)))


def doc_hash(key: str) -> float:
    """Stable uniform number in [0, 1) for a document key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(keys: Sequence[str], val_fraction: float) -> list[bool]:
    """is_val per document: hash(key) < val_fraction. With >= 2 documents both splits are
    non-empty (the lowest-hash document goes to val, the highest to train, if needed)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    h = [doc_hash(k) for k in keys]
    is_val = [x < val_fraction for x in h]
    if len(keys) >= 2:
        if not any(is_val):
            is_val[int(np.argmin(h))] = True
        if all(is_val):
            is_val[int(np.argmax(h))] = False
    return is_val


def _read_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The file in chunks of about chunk_bytes, each cut after its last newline when it has one
    (so a tokenizer never sees a word or a UTF-8 character split between chunks)."""
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
        return b"\0" in f.read(_BINARY_SNIFF)


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
        pieces = _pieces(text, _ENCODE_PIECE)
        ids = tok.encode_batch(pieces) if pieces else []  # type: ignore[attr-defined]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    return encode


def _pieces(text: str, size: int) -> list[str]:
    """text in pieces of about `size` characters, cut after newlines (encoded in parallel)."""
    out, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + size) + 1 if start + size < len(text) else 0
        end = end if end > start else min(len(text), start + size)
        out.append(text[start:end])
        start = end
    return out


def _text_docs(docs: Sequence[Document], is_val: Sequence[bool] | None, result: PrepareResult):
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


def prepare_corpus(
    inputs: Sequence[str],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    extensions: Sequence[str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    tokenizer: str | Tokenizer = "bytes",
    vocab_size: int | None = None,
) -> PrepareResult:
    """Tokenize `inputs` (files, folders, globs) into `out_dir/{train,val}.{bin,json}`
    (+ `tokenizer.json` unless the tokenizer is `bytes`)."""
    out = Path(out_dir).resolve()
    docs = [d for d in collect_documents(inputs, extensions) if out not in d.path.resolve().parents]
    if not docs:
        raise DataError(f"no files found in {list(inputs)}; nothing to prepare")
    return prepare_documents(
        docs, out_dir, val_fraction, chunk_bytes, progress, tokenizer=tokenizer,
        vocab_size=vocab_size,
    )  # fmt: skip


def prepare_documents(
    docs: Sequence[Document],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    is_val: Sequence[bool] | None = None,
    tokenizer: str | Tokenizer = "bytes",
    vocab_size: int | None = None,
) -> PrepareResult:
    """Tokenize `docs` (in the given order) into `out_dir/{train,val}.{bin,json}`.

    The split is `split_documents` of the keys unless `is_val` (one flag per doc) is given.
    `tokenizer`: `bytes`, `bpe` (byte-level BPE of `vocab_size` trained on the train split, saved
    as out_dir/tokenizer.json) or the path of a tokenizer.json (copied into out_dir).

    Each document is followed by the end-of-document token (0 for bytes and trained BPEs). A
    single document is split by position instead: its last `val_fraction` of bytes (at least one)
    become the val split. Empty files are ignored; binary files are skipped and listed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    result = PrepareResult(out_dir=out)
    if is_val is not None and len(is_val) != len(docs):
        raise ValueError(f"is_val has {len(is_val)} flags for {len(docs)} documents")
    text_docs, flags = _text_docs(docs, is_val, result)
    sizes = [d.path.stat().st_size for d in text_docs]
    if is_val is None:
        flags = split_documents([d.key for d in text_docs], val_fraction)
    cut = sizes[0] - max(1, round(sizes[0] * val_fraction))  # a single document's split point
    tok = make_tokenizer(
        tokenizer, vocab_size, lambda: _train_texts(text_docs, flags, cut, chunk_bytes)
    )
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train-prepare",
        description=textwrap.fill(
            "Turn text files into moe-train token files: OUT/train.bin, OUT/val.bin and their "
            ".json sidecars (+ OUT/tokenizer.json for a BPE). Each file is one document, "
            "followed by the end-of-document token (NUL bytes inside text are dropped; files "
            "with a NUL in their first 8 KiB are skipped as binary). Documents go to val when a "
            "hash of their path (relative to the input folder) falls below --val-fraction, so "
            "the split is reproducible and adding files does not reshuffle it; with a single "
            "document its tail becomes val.",
            width=79,
            break_on_hyphens=False,
        ),
        epilog=(
            "examples:\n"
            "  moe-train-prepare book.txt --out data/book\n"
            "  moe-train-prepare corpus/ --out data/corpus --ext .txt .md\n"
            "  moe-train-prepare 'corpus/**/*.txt' --out data/corpus   # quote the glob\n"
            "  moe-train-prepare corpus/ --out data/bpe --tokenizer bpe --vocab-size 4096\n"
            "  moe-train-prepare corpus/ --out data/gpt2 --tokenizer path/to/gpt2/tokenizer.json\n"
            "then train with: moe-train data.dir=data/corpus"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="a text file, a folder (read recursively, hidden entries skipped) or a glob",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        metavar="F",
        help="fraction of documents for validation, in (0, 1) (default: %(default)s)",
    )
    p.add_argument(
        "--ext",
        nargs="+",
        metavar="SUFFIX",
        help="only files with these suffixes, e.g. --ext .txt .md (default: all files)",
    )
    p.add_argument(
        "--chunk-mb",
        type=int,
        default=CHUNK_BYTES >> 20,
        metavar="MB",
        help="read files in chunks of this many MiB (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default="bytes",
        metavar="bytes|bpe|PATH",
        help="bytes (vocab 256, the default); bpe: train a byte-level BPE on the train split "
        "(Hugging Face tokenizers, offline) and save OUT/tokenizer.json; PATH: an existing "
        "tokenizer.json or a folder holding one (e.g. a Hugging Face model folder)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help=f"entries of the trained BPE, >= 257 (default {DEFAULT_BPE_VOCAB}; --tokenizer bpe)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def skipped_line(paths: Sequence[Path], shown: int = 3) -> str:
    """One line for all skipped binary files: the count and the first few names."""
    names = ", ".join(str(p) for p in paths[:shown])
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"skipped {len(paths)} binary file{'s' if len(paths) != 1 else ''}: {names}{more}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        build_parser().error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.chunk_mb <= 0:
        build_parser().error(f"--chunk-mb must be positive, got {args.chunk_mb}")
    ext = [e if e.startswith(".") else "." + e for e in args.ext] if args.ext else None
    try:
        r = prepare_corpus(
            args.inputs,
            args.out,
            args.val_fraction,
            ext,
            args.chunk_mb << 20,
            progress=not args.quiet,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
        )
    except DataError as e:
        print(f"moe-train-prepare: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        if r.skipped:
            print(skipped_line(r.skipped), file=sys.stderr)
        print(
            f"wrote {r.out_dir}/train.bin ({r.train_tokens:,} tokens, {r.train_docs} docs) and "
            f"{r.out_dir}/val.bin ({r.val_tokens:,} tokens, {r.val_docs} docs); tokenizer "
            f"{r.tokenizer}, vocabulary {r.vocab_size:,}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

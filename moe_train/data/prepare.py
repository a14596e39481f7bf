"""`moe-train-prepare`: text files -> `train.bin`/`val.bin` token files (byte-level tokenizer).

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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .tokenizer import ByteTokenizer
from .tokens import DataError, TokenWriter

DEFAULT_VAL_FRACTION = 0.05
CHUNK_BYTES = 16 << 20
_BINARY_SNIFF = 8192  # a NUL byte in a file's first 8 KiB marks it as binary: skipped
_GLOB_MAGIC = set("*?[")


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
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF)


def _to_tokens(chunk: bytes) -> np.ndarray:
    """bytes -> [n] uint16 ids, NUL bytes dropped (0 is the end-of-document token)."""
    arr = np.frombuffer(chunk, dtype=np.uint8)
    if not arr.all():
        arr = arr[arr != 0]
    return arr.astype(np.uint16)


def prepare_corpus(
    inputs: Sequence[str],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    extensions: Sequence[str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize `inputs` (files, folders, globs) into `out_dir/{train,val}.{bin,json}`."""
    out = Path(out_dir).resolve()
    docs = [d for d in collect_documents(inputs, extensions) if out not in d.path.resolve().parents]
    if not docs:
        raise DataError(f"no files found in {list(inputs)}; nothing to prepare")
    return prepare_documents(docs, out_dir, val_fraction, chunk_bytes, progress)


def prepare_documents(
    docs: Sequence[Document],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    is_val: Sequence[bool] | None = None,
) -> PrepareResult:
    """Tokenize `docs` (in the given order) into `out_dir/{train,val}.{bin,json}`.

    The split is `split_documents` of the keys unless `is_val` (one flag per doc) is given.

    Each document is followed by the end-of-document token 0. A single document is split by
    position instead: its last `val_fraction` of bytes (at least one) become the val split.
    Empty files are ignored; binary files are skipped and listed in the result.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = ByteTokenizer()
    out = Path(out_dir)
    result = PrepareResult(out_dir=out)
    if is_val is not None and len(is_val) != len(docs):
        raise ValueError(f"is_val has {len(is_val)} flags for {len(docs)} documents")
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
    sizes = [d.path.stat().st_size for d in text_docs]
    if is_val is None:
        flags = split_documents([d.key for d in text_docs], val_fraction)
    eot = np.array([tok.eot_id], dtype=np.uint16)

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
            )
        )
        if len(text_docs) == 1:
            cut = sizes[0] - max(1, round(sizes[0] * val_fraction))
            pos = 0
            for chunk in _read_chunks(text_docs[0].path, chunk_bytes):
                head = max(0, min(len(chunk), cut - pos))
                train.write(_to_tokens(chunk[:head]))
                val.write(_to_tokens(chunk[head:]))
                pos += len(chunk)
                bar.update(len(chunk))
            train.write(eot)
            val.write(eot)
            result.train_docs = result.val_docs = 1
        else:
            for d, v in zip(text_docs, flags):
                w = val if v else train
                for chunk in _read_chunks(d.path, chunk_bytes):
                    w.write(_to_tokens(chunk))
                    bar.update(len(chunk))
                w.write(eot)
                result.val_docs += v
                result.train_docs += not v
    result.train_tokens, result.val_tokens = train.num_tokens, val.num_tokens
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train-prepare",
        description=textwrap.fill(
            "Turn text files into moe-train token files (byte-level tokenizer, vocab 256): "
            "OUT/train.bin, OUT/val.bin and their .json sidecars. Each file is one document, "
            "followed by the end-of-document token 0 (NUL bytes inside text are dropped; files "
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
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


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
        )
    except DataError as e:
        print(f"moe-train-prepare: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for path in r.skipped:
            print(f"skipped binary file {path}", file=sys.stderr)
        print(
            f"wrote {r.out_dir}/train.bin ({r.train_tokens:,} tokens, {r.train_docs} docs) and "
            f"{r.out_dir}/val.bin ({r.val_tokens:,} tokens, {r.val_docs} docs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

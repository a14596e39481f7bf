"""A data source: a path as training reads it, whatever wrote it.

    folder with manifest.json        moe-train-prepare's shards (train-K / val-K)
    folder with train.bin, val.bin   moe-train's flat files (+ .json sidecars), or nanoGPT's raw
                                     uint16 files (no sidecars: give model.vocab_size)
    path/NAME (NAME.bin + NAME.idx)  a Megatron-LM indexed dataset, read in place
    folder of NAME.bin + NAME.idx    several Megatron datasets, concatenated in name order

A Megatron source has no validation split of its own: its last `holdout` share of documents is
held out (contiguous, like Megatron's --split). Its vocabulary comes from a `tokenizer.json` next
to it, else from model.vocab_size. Every source says which tokenizer made it (`tokenizer_id`:
"bytes", a hash of the tokenizer's canonical JSON, or None when unknown), so a mixture of sources
made by different tokenizers is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .megatron import IndexedTokens, is_indexed_prefix
from .shards import MANIFEST, is_sharded, open_sharded
from .streams import Segment, TokenStream
from .tokenizers import TOKENIZER_FILE, ByteTokenizer, HFTokenizer
from .tokens import DataError, TokenFile

_SHARD = re.compile(r"^(train|val)-\d{5,}\.idx$")  # moe-train-prepare's shard names


@dataclass
class Source:
    """One source's splits and what made them. `val` is None when it has no validation data."""

    name: str
    path: Path
    kind: str  # shards | flat | megatron
    train: TokenStream
    val: TokenStream | None
    vocab_size: int  # the data's vocabulary (before rounding to the model's)
    tokenizer: str  # what the metadata names: bytes | tokenizer.json | unknown
    tokenizer_folder: Path  # where that tokenizer file lies
    tokenizer_id: str | None  # bytes | sha256 of the canonical tokenizer JSON | None (unknown)
    # (file, largest id) of each of its token files, from metadata or one pass over the tokens
    largest_ids: Callable[[], list[tuple[str, int]]] = field(repr=False, default=lambda: [])
    eot_id: int | None = None  # the end-of-document token, when known

    def describe(self) -> str:
        val = f"{len(self.val):,}" if self.val is not None else "no"
        return f"{self.name} ({self.kind}, {len(self.train):,} train / {val} val tokens)"


@cache
def tokenizer_identity(path: Path) -> str:
    """sha256 of a tokenizer.json's canonical JSON, as the tokenizers library writes it (equal
    for the same tokenizer however its file is formatted)."""
    tok = HFTokenizer.from_file(path)
    canonical = json.dumps(json.loads(tok.tok.to_str()), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _tokenizer_of(folder: Path, name: str) -> tuple[str | None, int | None, int | None]:
    """(identity, vocab_size, eot_id) of the tokenizer a source names; Nones when unknown."""
    if name == ByteTokenizer.name:
        return "bytes", ByteTokenizer.vocab_size, ByteTokenizer.eot_id
    path = folder / (TOKENIZER_FILE if name == "unknown" else name)
    if not path.is_file():
        if name == "unknown":
            return None, None, None
        raise DataError(f"{folder}: its metadata names tokenizer {name!r}, but {path} is missing")
    tok = HFTokenizer.from_file(path)
    return tokenizer_identity(path), tok.vocab_size, tok.eot_id


def default_name(path: Path) -> str:
    """A source's name in metrics (`val_loss/<name>`): the folder or prefix name."""
    return path.name or str(path)


def source_kind(path: str | Path, label: str = "data path") -> tuple[str, list[Path]]:
    """(kind, Megatron prefixes) of a data path: shards | flat | megatron; a DataError naming
    `label` (e.g. data.dir) and what was looked for when it is none of them."""
    p = Path(path).expanduser()
    if p.is_dir() and is_sharded(p):
        return "shards", []
    if p.is_dir() and (p / "train.bin").is_file():
        return "flat", []
    if is_indexed_prefix(p):
        return "megatron", [p]
    if p.is_dir() and ((p / ".prepare").exists() or any(_SHARD.match(q.name) for q in p.iterdir())):
        raise DataError(
            f"{label}={str(path)!r}: an unfinished moe-train-prepare output (no {MANIFEST}); run "
            "the same moe-train-prepare command again: it keeps the finished shards and ends it"
        )
    if p.is_dir():
        prefixes = sorted(
            q.with_suffix("") for q in p.glob("*.idx") if q.with_suffix(".bin").is_file()
        )
        if prefixes:
            return "megatron", prefixes
        raise DataError(
            f"{label}={str(path)!r}: this folder holds no data: neither {MANIFEST} (moe-train-"
            "prepare's shards), nor train.bin + val.bin, nor Megatron NAME.bin + NAME.idx files; "
            f"create it with `moe-train-prepare YOUR_TEXT --out {path}`"
        )
    if Path(f"{p}.bin").is_file() or Path(f"{p}.idx").is_file():
        half = f"{p}.idx" if not Path(f"{p}.idx").is_file() else f"{p}.bin"
        raise DataError(f"{label}={str(path)!r}: a Megatron dataset needs {half} too")
    raise DataError(
        f"{label}={str(path)!r}: not found; create it with `moe-train-prepare YOUR_TEXT --out "
        f"{path}`, give a Megatron dataset prefix (path/NAME of NAME.bin + NAME.idx), or leave "
        "data.dir unset to use the embedded default corpus"
    )


def open_source(
    path: str | Path,
    vocab_size: int | None = None,
    holdout: float = 0.01,
    checksums: bool = True,
    name: str | None = None,
    label: str = "data path",
) -> Source:
    """The source at `path` (see the module docstring), validated. `vocab_size` opens sources
    that do not record theirs (nanoGPT files, Megatron files without a tokenizer.json)."""
    p = Path(path).expanduser()
    name = name or default_name(p)
    kind, prefixes = source_kind(p, label)
    if kind == "shards":
        return _sharded(p, name, checksums)
    if kind == "flat":
        return _flat(p, name, vocab_size)
    return _megatron(p, prefixes, name, vocab_size, holdout)


def _sharded(folder: Path, name: str, checksums: bool) -> Source:
    meta, streams = open_sharded(folder, checksums)
    tokenizer = meta["tokenizer"]
    if tokenizer != ByteTokenizer.name and not (folder / tokenizer).is_file():
        raise DataError(f"{folder}: {MANIFEST} names tokenizer {tokenizer!r}, but it is missing")
    ident = "bytes" if tokenizer == ByteTokenizer.name else meta.get("tokenizer_sha256")
    val = streams["val"] if len(streams["val"]) else None
    ids = [(f"{folder / MANIFEST} ({s})", meta["splits"][s]["max_token"]) for s in ("train", "val")]
    return Source(name, folder, "shards", streams["train"], val, meta["vocab_size"], tokenizer,
                  folder, ident, lambda: ids, meta.get("eot_id"))  # fmt: skip


def _flat(folder: Path, name: str, vocab_size: int | None) -> Source:
    if not (folder / "val.bin").is_file():
        raise DataError(
            f"{folder}: train.bin without val.bin; the folder must hold both (moe-train-prepare "
            "writes them), or re-create it with `moe-train-prepare`"
        )
    train, val = open_splits(folder, vocab_size)
    ident, _, eot = _tokenizer_of(folder, train.tokenizer)
    streams = [
        TokenStream([Segment(tf.tokens, str(tf.path), eot_id=eot)], str(tf.path))
        for tf in (train, val)
    ]
    ids = lambda: [(str(tf.path), tf.max_token) for tf in (train, val)]  # noqa: E731
    return Source(name, folder, "flat", streams[0], streams[1], train.vocab_size, train.tokenizer,
                  folder, ident, ids, eot)  # fmt: skip


def _megatron(
    where: Path, prefixes: list[Path], name: str, vocab_size: int | None, holdout: float
) -> Source:
    folder = where if where.is_dir() else where.parent
    ident, tok_vocab, eot = _tokenizer_of(folder, "unknown")
    vocab = tok_vocab or vocab_size
    if vocab is None:
        raise DataError(
            f"Megatron dataset {where}: its vocabulary is not recorded; give model.vocab_size=N "
            f"(e.g. 50304 for GPT-2), or put its tokenizer.json into {folder}"
        )
    parts = [IndexedTokens(p) for p in prefixes]
    segments = [Segment(t.tokens, str(t.bin), t) for t in parts]
    stream = TokenStream(segments, f"{where} (train)")
    docs = sum(t.num_documents for t in parts)
    n_val = 0 if holdout <= 0 else max(1, math.floor(holdout * docs))
    if n_val and docs - n_val < 1:
        raise DataError(
            f"Megatron dataset {where}: {docs} document(s), too few to hold out "
            f"data.holdout={holdout} of them for validation; set data.holdout=0 (no validation)"
        )
    cut = _document_start(parts, docs - n_val) if n_val else len(stream)
    train = stream.sub(0, cut)
    val = stream.sub(cut, len(stream)) if n_val else None
    if val is not None:
        val.name = f"{where} (val: the last {n_val} documents)"
    tokenizer = TOKENIZER_FILE if ident is not None else "unknown"
    ids = cache(lambda: [(str(t.bin), t.max_token()) for t in parts])
    return Source(name, where, "megatron", train, val, vocab, tokenizer, folder, ident, ids, eot)


def _document_start(parts: list[IndexedTokens], d: int) -> int:
    """Token position (in the concatenation) where global document d starts."""
    base = 0
    for t in parts:
        if d < t.num_documents:
            return base + t.document_token_start(d)
        d -= t.num_documents
        base += t.num_tokens
    return base


def flat_file_source(tokens: TokenFile, name: str | None = None) -> Source:
    """A bare token file as a training-only source (tests, tools)."""
    stream = TokenStream.of(tokens)
    ids = lambda: [(str(tokens.path), tokens.max_token)]  # noqa: E731
    return Source(name or tokens.path.stem, tokens.path, "flat", stream, None, tokens.vocab_size,
                  tokens.tokenizer, tokens.path.parent, None, ids)  # fmt: skip


def check_same_tokenizer(sources: list[Source]) -> None:
    """The sources of one mixture were made by one tokenizer with one vocabulary; else a
    DataError naming the two that differ."""
    first = sources[0]
    for other in sources[1:]:
        a, b = first.tokenizer_id, other.tokenizer_id
        if a != b or first.vocab_size != other.vocab_size:

            def what(s: Source) -> str:
                tok = {None: "an unknown tokenizer", "bytes": "bytes"}.get(
                    s.tokenizer_id,
                    f"{s.tokenizer_folder / TOKENIZER_FILE} (sha256 {str(s.tokenizer_id)[:12]})",
                )
                return f"{s.name!r} ({s.path}: {tok}, vocabulary {s.vocab_size})"

            hint = (
                " (a source without a tokenizer.json cannot be checked: put its tokenizer.json "
                "next to it)"
                if None in (a, b) and a != b
                else ""
            )
            raise DataError(
                f"data.mix: sources {what(first)} and {what(other)} use different tokenizers or "
                f"vocabularies{hint}; prepare every source with the same --tokenizer"
            )


def open_splits(data_dir: str | Path, vocab_size: int | None = None) -> tuple[TokenFile, TokenFile]:
    """(train, val) token files of a flat data folder, validated and with matching vocabularies.
    `vocab_size` opens a nanoGPT folder (raw uint16 files without sidecars)."""
    d = Path(data_dir)
    train, val = TokenFile(d / "train.bin", vocab_size), TokenFile(d / "val.bin", vocab_size)
    if (train.vocab_size, train.tokenizer) != (val.vocab_size, val.tokenizer):
        raise DataError(
            f"{d}: train.bin (vocab {train.vocab_size}, {train.tokenizer}) and val.bin "
            f"(vocab {val.vocab_size}, {val.tokenizer}) disagree; re-run moe-train-prepare"
        )
    return train, val

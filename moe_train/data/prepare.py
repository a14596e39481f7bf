"""`moe-train-prepare`: corpora -> a sharded token folder (manifest.json + train-K/val-K shards).

    moe-train-prepare 'fineweb/*.parquet' --out data/web --tokenizer path/to/tokenizer.json --workers 8
    moe-train-prepare dolma/ --out data/dolma --text-field text --skip-bad
    moe-train-prepare book.txt --out data/book

Inputs (moe_train/data/readers.py): plain text files, JSON Lines (`.jsonl`, `.ndjson`, `.json`,
also `.gz`/`.zst`), JSON arrays, Parquet (by row groups), Arrow files and `datasets`
`save_to_disk` folders, CSV/TSV (through `datasets.load_dataset`); a file, a folder or a glob,
kinds mixed. Tokenizers: `bytes` (built in, vocab 256), `bpe` (a byte-level BPE trained here on
the train split, offline) or the path of an existing `tokenizer.json`.

The output (moe_train/data/shards.py) is the same bytes for any `--workers`; a rerun after a crash
keeps the finished shards and builds the rest (moe_train/data/pipeline.py). A record's split is
decided by a hash of its identity (file + record index; a plain file: its path relative to its
input), so it does not depend on where the corpus lives, and adding files never moves existing
records between splits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import readers
from .flat import DEFAULT_BPE_VOCAB, Document, make_tokenizer, prepare_documents  # noqa: F401
from .pipeline import (
    DEFAULT_SHARD_MB,
    WORK_DIR,
    Plan,
    Settings,
    Unit,
    WorkerContext,
    doc_hash,
    execute,
    plan,
    plan_units,
    record_identity,
    split_documents,
    write_manifest,
)
from .readers import ReadStats, TextField
from .shards import MANIFEST, write_json_atomic
from .tokenizers import TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer
from .tokens import DataError

DEFAULT_VAL_FRACTION = 0.05
CHUNK_BYTES = 16 << 20
BPE_RECORD = "bpe.json"  # in the work folder: which corpus the saved BPE was trained on
_FLAT_FILES = ("train.bin", "val.bin", "train.json", "val.json")

__all__ = [
    "PrepareResult", "build_parser", "doc_hash", "main", "make_tokenizer", "prepare_corpus",
    "prepare_documents", "split_documents",
]  # fmt: skip


@dataclass
class PrepareResult:
    out_dir: Path
    train_docs: int = 0
    val_docs: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    skipped: list[Path] = field(default_factory=list)  # binary files
    tokenizer: str = "bytes"  # what the manifest names: bytes or tokenizer.json
    vocab_size: int = 256
    shards: int = 0
    resumed: int = 0  # shards an earlier, interrupted run had finished
    stats: ReadStats = field(default_factory=ReadStats)


def tokenizer_sha256(tok: Tokenizer) -> str | None:
    """A hash of the tokenizer's canonical JSON (None for bytes): equal for equal tokenizers
    however their files are formatted."""
    if isinstance(tok, ByteTokenizer):
        return None
    canonical = json.dumps(json.loads(tok.tok.to_str()), sort_keys=True)  # type: ignore[attr-defined]
    return hashlib.sha256(canonical.encode()).hexdigest()


def train_texts(units: Sequence[Unit], settings: Settings) -> Iterator[str]:
    """The training split's texts, in order (what a BPE is trained on)."""
    stats = ReadStats()
    field_ = TextField(settings.text_field, settings.skip_bad, stats)
    for u in units:
        f = u.file
        if f.kind == "text":
            if u.split == "val" or (
                u.split is None and u.cut is None and _is_val(f.key, None, settings)
            ):
                continue
            for chunk in readers.text_chunks(f, settings.chunk_bytes, None, 0, u.cut):
                yield chunk.replace(b"\0", b"").decode("utf-8", errors="replace")
            continue
        if f.kind == "json":
            records = readers.json_records(f, field_)
        elif f.kind == "parquet":
            records = readers.parquet_records(f, u.group, u.first, field_)
        elif f.kind == "arrow":
            records = readers.arrow_records(f, field_)
        else:
            records = readers.csv_records(f, field_)
        for index, text in records:
            if text and not text.isspace() and not _is_val(f.key, index, settings):
                yield text.replace("\0", "")


def _is_val(key: str, index: int | None, settings: Settings) -> bool:
    return doc_hash(record_identity(key, index)) < settings.val_fraction


def _choose_tokenizer(
    spec: str | Tokenizer, vocab_size: int | None, units: list[Unit], settings: Settings, out: Path
) -> Tokenizer:
    """The tokenizer; a BPE an interrupted run trained on the same corpus is reused (so the
    rerun writes the same shards)."""
    if spec != "bpe":
        return make_tokenizer(spec, vocab_size, lambda: [])
    st = [u.describe() for u in units]
    request = {"corpus": hashlib.sha256(json.dumps([st, asdict(settings)]).encode()).hexdigest(),
               "vocab_size": vocab_size or DEFAULT_BPE_VOCAB}  # fmt: skip
    record = out / WORK_DIR / BPE_RECORD
    try:
        if json.loads(record.read_text()) == request and (out / TOKENIZER_FILE).is_file():
            return HFTokenizer.from_file(out / TOKENIZER_FILE)
    except (OSError, ValueError):
        pass
    tok = make_tokenizer("bpe", vocab_size, lambda: train_texts(units, settings))
    tok.save(out)
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, request)
    return tok


class _Progress:
    """The progress bar: input bytes (with ETA), documents/s and tokens/s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024,
            desc="tokenizing", disable=not enabled, smoothing=0.1,
        )  # fmt: skip
        self.docs = self.tokens = 0
        self.t0 = time.monotonic()

    def __call__(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bar.update(nbytes)
        dt = max(1e-9, time.monotonic() - self.t0)
        self.bar.set_postfix_str(
            f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False
        )

    def resumed(self, nbytes: int) -> None:
        """Input bytes of shards kept from an interrupted run: done, but not part of the rate."""
        self.bar.initial = self.bar.n = nbytes
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def prepare_corpus(
    inputs: Sequence[str],
    out_dir: str | os.PathLike[str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    extensions: Sequence[str] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
    tokenizer: str | Tokenizer = "bytes",
    vocab_size: int | None = None,
    text_field: str = "text",
    workers: int = 1,
    skip_bad: bool = False,
    shard_bytes: int = DEFAULT_SHARD_MB << 20,
) -> PrepareResult:
    """Tokenize `inputs` (files, folders, globs) into the sharded folder `out_dir`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if workers < 1 or shard_bytes < 1 or chunk_bytes < 1:
        raise ValueError(f"workers, shard_bytes and chunk_bytes must be >= 1, got {workers}, "
                         f"{shard_bytes}, {chunk_bytes}")  # fmt: skip
    out = Path(out_dir).resolve()
    files = readers.discover(inputs, extensions, exclude=out)
    if not files:
        raise DataError(f"no files found in {list(inputs)}; nothing to prepare")
    settings = Settings(text_field, val_fraction, skip_bad, chunk_bytes)
    units, stats = plan_units(files, settings)
    out.mkdir(parents=True, exist_ok=True)
    tok = _choose_tokenizer(tokenizer, vocab_size, units, settings, out)
    sha = tokenizer_sha256(tok)
    the_plan = plan(units, stats, settings, shard_bytes, sha or "bytes")
    tok.save(out)
    if isinstance(tok, ByteTokenizer):
        (out / TOKENIZER_FILE).unlink(missing_ok=True)  # a stale BPE of an earlier run
    ctx = WorkerContext(out, settings, None if sha is None else tok.tok.to_str(),  # type: ignore[attr-defined]
                        int(tok.vocab_size), int(tok.eot_id))  # fmt: skip
    bar = _Progress(the_plan.total_bytes, progress)
    try:
        run = execute(the_plan, ctx, workers, bar, bar.resumed)
    finally:
        bar.close()
    meta = write_manifest(out, run, tok, sha, settings)
    _remove_flat_files(out)
    return _result(out, the_plan, run, meta)


def _remove_flat_files(out: Path) -> None:
    """train.bin/val.bin (+ sidecars) an earlier moe-train-prepare wrote here: replaced by the
    shards (training reads manifest.json first anyway)."""
    if (out / "train.json").is_file() and (out / MANIFEST).is_file():
        for name in _FLAT_FILES:
            (out / name).unlink(missing_ok=True)


def _result(out: Path, the_plan: Plan, run, meta) -> PrepareResult:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    return PrepareResult(
        out_dir=out, train_docs=train["documents"], val_docs=val["documents"],
        train_tokens=train["tokens"], val_tokens=val["tokens"],
        skipped=[Path(p) for p in the_plan.stats.binary_files], tokenizer=meta["tokenizer"],
        vocab_size=meta["vocab_size"], shards=len(the_plan.jobs), resumed=run.resumed,
        stats=run.stats,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train-prepare",
        description=textwrap.fill(
            "Turn a corpus into a moe-train data folder: OUT/manifest.json and shards "
            "OUT/train-00000.bin/.idx, OUT/val-00000.bin/.idx, ... (Megatron's indexed "
            "layout: tokens + document index), + OUT/tokenizer.json for a BPE. Inputs: plain "
            "text files (one document each; binary files skipped), JSON Lines (.jsonl, "
            ".ndjson, .json; .gz and .zst too), JSON arrays, Parquet, Arrow files and `datasets` "
            "save_to_disk folders, CSV/TSV. Each document is followed by the end-of-document "
            "token. A record goes to val when a hash of its identity (file + record index) "
            "falls below --val-fraction, so the split is reproducible and adding files does "
            "not reshuffle it; a single plain file's tail becomes val. The output is the same "
            "for any --workers; a rerun after a crash keeps the finished shards.",
            width=79,
            break_on_hyphens=False,
        ),
        epilog=(
            "examples:\n"
            "  moe-train-prepare book.txt --out data/book\n"
            "  moe-train-prepare corpus/ --out data/corpus --ext .txt .md\n"
            "  moe-train-prepare 'corpus/**/*.txt' --out data/corpus   # quote the glob\n"
            "  moe-train-prepare 'web/*.jsonl.zst' --out data/web --workers 8\n"
            "  moe-train-prepare 'fineweb/*.parquet' --out data/fw --tokenizer gpt2/tokenizer.json\n"
            "  moe-train-prepare docs.jsonl --out data/docs --text-field meta.body --skip-bad\n"
            "  moe-train-prepare corpus/ --out data/bpe --tokenizer bpe --vocab-size 4096\n"
            "then train with: moe-train data.dir=data/corpus"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="a file, a folder (read recursively, hidden entries skipped) or a glob",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument(
        "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
        help="fraction of documents for validation, in (0, 1) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--text-field", default="text", metavar="FIELD",
        help="the text of a record (JSON, Parquet, Arrow, CSV); a dotted path for nested "
        "records, e.g. meta.content (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--skip-bad", action="store_true",
        help="count and skip lines that are not JSON and records without a string text "
        "(default: stop with an error naming the file and line)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="tokenizer processes (default 1); the output does not depend on it",
    )  # fmt: skip
    p.add_argument(
        "--shard-mb", type=int, default=DEFAULT_SHARD_MB, metavar="MB",
        help="input MiB per shard (default: %(default)s); one input file or Parquet row group "
        "is never split, so a larger one is a shard of its own",
    )  # fmt: skip
    p.add_argument(
        "--ext", nargs="+", metavar="SUFFIX",
        help="only files with these suffixes, e.g. --ext .txt .jsonl.zst (default: all files)",
    )  # fmt: skip
    p.add_argument(
        "--chunk-mb", type=int, default=CHUNK_BYTES >> 20, metavar="MB",
        help="read plain files in chunks of this many MiB (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", default="bytes", metavar="bytes|bpe|PATH",
        help="bytes (vocab 256, the default); bpe: train a byte-level BPE on the train split "
        "(Hugging Face tokenizers, offline) and save OUT/tokenizer.json; PATH: an existing "
        "tokenizer.json or a folder holding one (e.g. a Hugging Face model folder)",
    )  # fmt: skip
    p.add_argument(
        "--vocab-size", type=int, metavar="N",
        help=f"entries of the trained BPE, >= 257 (default {DEFAULT_BPE_VOCAB}; --tokenizer bpe)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def skipped_line(paths: Sequence[Path], shown: int = 3) -> str:
    """One line for all skipped binary files: the count and the first few names."""
    names = ", ".join(str(p) for p in paths[:shown])
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"skipped {len(paths)} binary file{'s' if len(paths) != 1 else ''}: {names}{more}"


def summary(r: PrepareResult) -> str:
    s = r.stats
    skipped = [f"{n} {what}" for n, what in ((s.empty, "empty documents"), (s.bad_json, "lines "
               "that are not JSON"), (s.bad_text, "records without a string text")) if n]  # fmt: skip
    return (
        f"wrote {r.out_dir}: {r.shards} shard{'s' if r.shards != 1 else ''}"
        + (f" ({r.resumed} kept from an interrupted run)" if r.resumed else "")
        + f", train {r.train_tokens:,} tokens ({r.train_docs:,} docs), val {r.val_tokens:,} "
        f"tokens ({r.val_docs:,} docs); tokenizer {r.tokenizer}, vocabulary {r.vocab_size:,}"
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    for name in ("chunk_mb", "workers", "shard_mb"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    ext = [e if e.startswith(".") else "." + e for e in args.ext] if args.ext else None
    try:
        r = prepare_corpus(
            args.inputs, args.out, args.val_fraction, ext, args.chunk_mb << 20,
            progress=not args.quiet, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            text_field=args.text_field, workers=args.workers, skip_bad=args.skip_bad,
            shard_bytes=args.shard_mb << 20,
        )  # fmt: skip
    except DataError as e:
        print(f"moe-train-prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-train-prepare: interrupted; run it again to resume", file=sys.stderr)
        return 130
    if not args.quiet:
        if r.skipped:
            print(skipped_line(r.skipped), file=sys.stderr)
        print(summary(r))
        if r.val_tokens == 0:
            print("note: the validation split is empty; raise --val-fraction", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

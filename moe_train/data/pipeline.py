"""`moe-train-prepare`'s engine: inputs -> units -> shards, tokenized by N worker processes.

1. Plan (main process, cheap: file sizes and Parquet metadata). Every input file is one unit, a
   Parquet file one unit per row group. Consecutive units form a shard until it holds
   `shard_bytes` of input (a larger unit is a shard of its own). The plan depends on the inputs
   and the settings only, never on the number of workers.
2. Tokenize: each shard is one job. A worker reads its units' records, decides each record's
   split by a hash of its identity, and streams tokens into `train-K`/`val-K` under temporary
   names, renamed when complete; then it records the shard in `OUT/.prepare/shard-K.json`. So
   the output is the same bytes for any number of workers, and a crash leaves only complete
   shards (and temporaries, removed by the next run).
3. Finish: `manifest.json` from the shard records (written last), `.prepare/` removed.

A rerun with the same inputs and settings keeps every shard whose record matches its plan (and
whose files verify) and redoes the rest, so it resumes where a crash stopped and ends with the
same files as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import readers
from .megatron import IndexedWriter, bin_path, idx_path, token_dtype
from .readers import InputFile, ReadStats, TextField
from .shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    VERSION,
    file_crc32,
    read_manifest,
    shard_files,
    shard_name,
    write_json_atomic,
)
from .tokens import DataError

WORK_DIR = ".prepare"  # shard records of an unfinished run
DEFAULT_SHARD_MB = 256
_BATCH_CHARS = 1 << 20  # characters of records encoded together
_BATCH_RECORDS = 1024
_ENCODE_PIECE = 1 << 20  # characters per piece of a long plain document
_REPORT_S = 0.25  # seconds between a worker's progress messages
_SHARD_FILE = re.compile(r"^(train|val)-\d{5,}\.(bin|idx)$")


def doc_hash(key: str) -> float:
    """Stable uniform number in [0, 1) for a document identity."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def record_identity(key: str, index: int | None) -> str:
    """What the split hashes: a plain file's key; a record's key and index."""
    return key if index is None else f"{key}\0{index}"


def split_documents(keys: Sequence[str], val_fraction: float) -> list[bool]:
    """is_val per plain document: hash(key) < val_fraction. With >= 2 documents both splits are
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


@dataclass(frozen=True)
class Settings:
    """What changes the output besides the inputs and the tokenizer."""

    text_field: str = "text"
    val_fraction: float = 0.05
    skip_bad: bool = False
    chunk_bytes: int = 16 << 20


@dataclass(frozen=True)
class Unit:
    """A piece of one input file read by one worker: the whole file, or one Parquet row group.
    `split` forces a plain document's split; `cut` splits the only plain document by position
    (byte where val starts)."""

    file: InputFile
    group: int = -1  # Parquet row group; -1 = the whole file
    first: int = 0  # index in the file of the unit's first record
    nbytes: int = 0  # on-disk bytes (shard sizes and the progress bar)
    split: str | None = None
    cut: int | None = None

    def describe(self) -> list[Any]:
        """What identifies the unit's content (its file's size and modification time)."""
        st = self.file.path.stat()
        return [self.file.key, self.file.kind, self.group, self.first, self.split, self.cut,
                st.st_size, st.st_mtime_ns]  # fmt: skip


@dataclass
class ShardJob:
    index: int
    units: list[Unit]
    spec: str  # hash of everything the shard's bytes depend on


@dataclass
class Plan:
    units: list[Unit]
    jobs: list[ShardJob]
    stats: ReadStats  # what planning skipped: binary and empty plain files
    fingerprint: str  # the whole corpus (for reusing a trained BPE)

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def plan_units(files: Sequence[InputFile], settings: Settings) -> tuple[list[Unit], ReadStats]:
    """Units of every readable input, in order; binary and empty plain files are counted."""
    stats = ReadStats()
    units: list[Unit] = []
    column = TextField(settings.text_field, settings.skip_bad, stats).column
    for f in files:
        if f.kind == "text":
            if f.size == 0:
                stats.empty += 1
            elif readers.looks_binary(f):
                stats.binary_files.append(str(f.path))
            else:
                units.append(Unit(f, nbytes=f.size))
        elif f.kind == "parquet":
            for group, first, nbytes in readers.parquet_units(f, column):
                units.append(Unit(f, group, first, nbytes))
        else:
            if f.kind == "arrow":
                readers.arrow_check(f, column)
            units.append(Unit(f, nbytes=f.size))
    return _plain_splits(units, settings.val_fraction), stats


def _plain_splits(units: list[Unit], val_fraction: float) -> list[Unit]:
    """A corpus of plain files only keeps the old rules: both splits non-empty with >= 2 files,
    and one uncompressed file is split by position (its tail is val)."""
    if not units or any(u.file.kind != "text" for u in units):
        return units
    if len(units) == 1:
        u = units[0]
        if u.file.compression is None:
            return [
                Unit(u.file, nbytes=u.nbytes, cut=u.nbytes - max(1, round(u.nbytes * val_fraction)))
            ]
        return units
    flags = split_documents([u.file.key for u in units], val_fraction)
    return [
        Unit(u.file, nbytes=u.nbytes, split="val" if v else "train") for u, v in zip(units, flags)
    ]


def plan(
    units: list[Unit], stats: ReadStats, settings: Settings, shard_bytes: int, tokenizer_id: str
) -> Plan:
    """Units (plan_units) grouped into shard jobs of about shard_bytes of input each."""
    if not units:
        raise DataError(
            "no readable text in the inputs: they are empty or binary "
            f"({stats.empty} empty, {len(stats.binary_files)} binary files); nothing to prepare"
        )
    groups: list[list[Unit]] = [[]]
    size = 0
    for u in units:
        if groups[-1] and size + u.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.nbytes
    base = [FORMAT, VERSION, asdict(settings), tokenizer_id]
    jobs = [ShardJob(k, g, _hash([*base, [u.describe() for u in g]])) for k, g in enumerate(groups)]
    return Plan(units, jobs, stats, _hash([base, [u.describe() for u in units]]))


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# -- the worker ----------------------------------------------------------------------------------


@dataclass
class WorkerContext:
    """What every shard job needs besides its units (sent once per worker process)."""

    out: Path
    settings: Settings
    tokenizer_json: str | None  # None: bytes
    vocab_size: int
    eot_id: int


_CTX: WorkerContext | None = None
_TOKENIZER: Any = None
_REPORT: Callable[[int, int, int], None] | None = None  # (documents, tokens, bytes)


def _init_worker(ctx: WorkerContext, queue: Any) -> None:
    global _CTX, _TOKENIZER, _REPORT
    _CTX, _TOKENIZER = ctx, None
    _REPORT = (lambda d, t, b: queue.put((d, t, b))) if queue is not None else None


def _set_reporter(report: Callable[[int, int, int], None] | None) -> None:
    global _REPORT
    _REPORT = report


def _tokenizer(ctx: WorkerContext) -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        if ctx.tokenizer_json is None:
            from .tokenizers import ByteTokenizer

            _TOKENIZER = ByteTokenizer()
        else:
            from .tokenizers import HFTokenizer, _import_tokenizers

            tok = _import_tokenizers().Tokenizer.from_str(ctx.tokenizer_json)
            _TOKENIZER = HFTokenizer(tok, "tokenizer.json")
    return _TOKENIZER


class _Reporter:
    """A worker's progress, sent at most every _REPORT_S seconds."""

    def __init__(self) -> None:
        self.docs = self.tokens = self.bytes = 0
        self.last = time.monotonic()

    def add(self, docs: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        self.docs, self.tokens, self.bytes = (
            self.docs + docs,
            self.tokens + tokens,
            self.bytes + nbytes,
        )
        if time.monotonic() - self.last > _REPORT_S:
            self.flush()

    def flush(self) -> None:
        if _REPORT is not None and (self.docs or self.tokens or self.bytes):
            _REPORT(self.docs, self.tokens, self.bytes)
        self.docs = self.tokens = self.bytes = 0
        self.last = time.monotonic()


class _ShardWriter:
    """The train and val writers of one shard, fed documents in order."""

    def __init__(self, ctx: WorkerContext, index: int, reporter: _Reporter) -> None:
        dtype = token_dtype(ctx.vocab_size)
        self.writers = {s: IndexedWriter(ctx.out / shard_name(s, index), dtype) for s in SPLITS}
        self.eot = np.array([ctx.eot_id], dtype=np.int64)
        self.tok = _tokenizer(ctx)
        self.reporter = reporter
        self.batch: list[tuple[str, str]] = []  # (split, text)
        self.chars = 0

    def add_text(self, split: str, text: str) -> None:
        if "\0" in text:
            text = text.replace("\0", "")
        self.batch.append((split, text))
        self.chars += len(text)
        if self.chars >= _BATCH_CHARS or len(self.batch) >= _BATCH_RECORDS:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        for (split, _), ids in zip(self.batch, self._encode([t for _, t in self.batch])):
            self.writers[split].add(ids)
            self.end_document(split, len(ids))
        self.batch, self.chars = [], 0

    def end_document(self, split: str, ntokens: int) -> None:
        self.writers[split].add(self.eot)
        self.writers[split].end_document()
        self.reporter.add(docs=1, tokens=ntokens + 1)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        from .tokenizers import ByteTokenizer

        if isinstance(self.tok, ByteTokenizer):
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        return self.tok.encode_batch(texts)

    def add_chunk(self, split: str, chunk: bytes) -> int:
        """Part of a long plain document (bytes, cut after a newline): its tokens appended."""
        from .tokenizers import ByteTokenizer

        chunk = chunk.replace(b"\0", b"")
        if isinstance(self.tok, ByteTokenizer):
            ids = np.frombuffer(chunk, dtype=np.uint8)
            self.writers[split].add(ids)
            return len(ids)
        pieces = pieces_of(chunk.decode("utf-8", errors="replace"), _ENCODE_PIECE)
        n = 0
        for ids in self.tok.encode_batch(pieces) if pieces else []:
            self.writers[split].add(ids)
            n += len(ids)
        return n

    def finish(self) -> dict[str, Any]:
        self.flush()
        out = {}
        for split, w in self.writers.items():
            w.finish()
            out[split] = {
                "name": w.prefix.name, "tokens": w.num_tokens, "documents": w.num_documents,
                "max_token": w.max_token,
                "bin": {"bytes": w.nbytes["bin"], "crc32": w.crc32["bin"]},
                "idx": {"bytes": w.nbytes["idx"], "crc32": w.crc32["idx"]},
            }  # fmt: skip
        return out

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def pieces_of(text: str, size: int) -> list[str]:
    """text in pieces of about `size` characters, cut after newlines (encoded in parallel)."""
    out, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + size) + 1 if start + size < len(text) else 0
        end = end if end > start else min(len(text), start + size)
        out.append(text[start:end])
        start = end
    return out


def _char_boundary(path: Path, cut: int) -> int:
    """The first byte position >= cut that does not split a UTF-8 character."""
    with open(path, "rb") as f:
        f.seek(cut)
        tail = f.read(4)
    i = 0
    while i < len(tail) and tail[i] & 0xC0 == 0x80:
        i += 1
    return cut + i


def _val_of(unit: Unit, index: int | None, val_fraction: float) -> str:
    if unit.split is not None:
        return unit.split
    return "val" if doc_hash(record_identity(unit.file.key, index)) < val_fraction else "train"


def _write_plain(w: _ShardWriter, unit: Unit, ctx: WorkerContext, stats: ReadStats) -> None:
    """A plain file: one document (or, with `cut`, a train head and a val tail)."""
    s = ctx.settings
    stats.records += 1
    if unit.cut is None:
        split = _val_of(unit, None, s.val_fraction)
        report = lambda n: w.reporter.add(nbytes=n)  # noqa: E731
        chunks = readers.text_chunks(unit.file, s.chunk_bytes, report)
        w.end_document(split, sum(w.add_chunk(split, c) for c in chunks))
        return
    from .tokenizers import ByteTokenizer

    cut = unit.cut if isinstance(w.tok, ByteTokenizer) else _char_boundary(unit.file.path, unit.cut)
    for split, lo, hi in (("train", 0, cut), ("val", cut, None)):
        chunks = readers.text_chunks(unit.file, s.chunk_bytes, None, lo, hi)
        w.end_document(split, sum(w.add_chunk(split, c) for c in chunks))
    w.reporter.add(nbytes=unit.nbytes)


def _records(unit: Unit, field_: TextField, reporter: _Reporter) -> Iterator[tuple[int, str]]:
    f = unit.file
    on_read = lambda n: reporter.add(nbytes=n)  # noqa: E731
    if f.kind == "json":
        return readers.json_records(f, field_, on_read)
    if f.kind in ("parquet", "arrow"):
        rows = _rows_to_bytes(unit, reporter)
        if f.kind == "parquet":
            return readers.parquet_records(f, unit.group, unit.first, field_, rows)
        return readers.arrow_records(f, field_, rows)
    return _counted(readers.csv_records(f, field_), unit, reporter)


def _rows_to_bytes(unit: Unit, reporter: _Reporter) -> Callable[[int], None]:
    """Progress of a table unit: its bytes in proportion to the rows read (rows known after)."""
    if unit.file.kind == "parquet":
        pq = readers.need("pyarrow.parquet")
        total = pq.ParquetFile(unit.file.path).metadata.row_group(unit.group).num_rows
    else:
        total = None
    state = {"rows": 0, "sent": 0}

    def on_rows(n: int) -> None:
        state["rows"] += n
        if total:
            due = unit.nbytes * min(state["rows"], total) // total
            reporter.add(nbytes=due - state["sent"])
            state["sent"] = due

    return on_rows


def _counted(records: Iterator[tuple[int, str]], unit: Unit, reporter: _Reporter):
    yield from records
    reporter.add(nbytes=unit.nbytes)


def build_shard(job: ShardJob) -> dict[str, Any]:
    """Tokenize one shard job into its files; returns (and records in .prepare/) its entry."""
    ctx = _CTX
    assert ctx is not None, "the worker context is set by _init_worker"
    reporter = _Reporter()
    stats = ReadStats()
    field_ = TextField(ctx.settings.text_field, ctx.settings.skip_bad, stats)
    w = _ShardWriter(ctx, job.index, reporter)
    try:
        for unit in job.units:
            if unit.file.kind == "text":
                w.flush()
                _write_plain(w, unit, ctx, stats)
                continue
            for index, text in _records(unit, field_, reporter):
                if not text or text.isspace():
                    stats.empty += 1
                else:
                    w.add_text(_val_of(unit, index, ctx.settings.val_fraction), text)
        splits = w.finish()
    except BaseException:
        w.abort()
        raise
    reporter.flush()
    record = {"index": job.index, "spec": job.spec, **splits, "stats": stats.as_dict()}
    write_json_atomic(ctx.out / WORK_DIR / f"shard-{job.index:05d}.json", record)
    return record


# -- the main process ----------------------------------------------------------------------------


@dataclass
class RunResult:
    shards: list[dict[str, Any]]
    resumed: int  # shards kept from an earlier run
    stats: ReadStats = field(default_factory=ReadStats)


def _finished(out: Path, job: ShardJob) -> dict[str, Any] | None:
    """The record of a shard an earlier run finished with this plan, if its files verify."""
    path = out / WORK_DIR / f"shard-{job.index:05d}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("spec") != job.spec:
        return None
    for split in SPLITS:
        for part in ("bin", "idx"):
            p = out / f"{record[split]['name']}.{part}"
            want = record[split][part]
            if (
                not p.is_file()
                or p.stat().st_size != want["bytes"]
                or file_crc32(p) != want["crc32"]
            ):
                return None
    return record


def remove_temporaries(out: Path) -> None:
    """Temporary files a killed run left (never read: only complete files have final names)."""
    for folder in (out, out / WORK_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    p.unlink(missing_ok=True)


def _pool_context() -> Any:
    """fork where it is safe and cheap (Linux: no re-import of torch), else spawn."""
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _drain(queue: Any, on_progress: Callable[[int, int, int], None]) -> None:
    import queue as queues

    while True:
        try:
            item = queue.get_nowait()
        except queues.Empty:
            return
        on_progress(*item)


def run_jobs(
    jobs: list[ShardJob],
    ctx: WorkerContext,
    workers: int,
    on_progress: Callable[[int, int, int], None],
) -> list[dict[str, Any]]:
    """Every job, on `workers` processes (1: in this process); records in job order. A worker
    that fails stops the run (the others are ended; a worker killed by the OS is reported)."""
    records: dict[int, dict[str, Any]] = {}
    if workers <= 1 or len(jobs) <= 1:
        _init_worker(ctx, None)
        _set_reporter(on_progress)
        try:
            for job in jobs:
                records[job.index] = build_shard(job)
        finally:
            _set_reporter(None)
        return [records[j.index] for j in jobs]
    mpc = _pool_context()
    queue = mpc.Queue()
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: N workers, N cores
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mpc, _init_worker, (ctx, queue))
    drain = lambda: _drain(queue, on_progress)  # noqa: E731
    try:
        pending = {pool.submit(build_shard, job) for job in jobs}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    record = fut.result()
                except BrokenProcessPool:
                    raise DataError(
                        "a moe-train-prepare worker died (killed by the OS: out of memory?); "
                        "run again with fewer --workers (finished shards are kept)"
                    ) from None
                records[record["index"]] = record
            drain()
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):  # end the others now
            p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        drain()
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return [records[j.index] for j in jobs]


def execute(
    the_plan: Plan,
    ctx: WorkerContext,
    workers: int,
    on_progress: Callable[[int, int, int], None],
    on_resumed: Callable[[int], None] | None = None,
) -> RunResult:
    """Keep the shards an earlier run finished with this plan (their input bytes go to
    on_resumed), build the others (progress to on_progress(documents, tokens, bytes))."""
    out = ctx.out
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    done = {j.index: r for j in the_plan.jobs if (r := _finished(out, j)) is not None}
    todo = [j for j in the_plan.jobs if j.index not in done]
    if on_resumed is not None:
        on_resumed(sum(u.nbytes for j in the_plan.jobs if j.index in done for u in j.units))
    try:
        built = run_jobs(todo, ctx, workers, on_progress)
    except BaseException:
        remove_temporaries(out)
        raise
    records = {**done, **{r["index"]: r for r in built}}
    shards = [records[j.index] for j in the_plan.jobs]
    stats = ReadStats()
    stats.add(the_plan.stats)
    for r in shards:
        s = r["stats"]
        stats.records += s["records"]
        stats.empty += s["empty"]
        stats.bad_json += s["bad_json"]
        stats.bad_text += s["bad_text"]
    return RunResult(shards, len(done), stats)


def write_manifest(
    out: Path,
    result: RunResult,
    tokenizer: Any,
    tokenizer_sha: str | None,
    settings: Settings,
) -> dict[str, Any]:
    """manifest.json from the shard records (atomically, last); then .prepare/ and the files
    of an earlier, different manifest that this one does not list are removed."""
    old = read_manifest(out) if (out / MANIFEST).is_file() else None
    splits = {}
    for split in SPLITS:
        shards = [r[split] for r in result.shards]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "max_token": max((s["max_token"] for s in shards), default=-1),
            "shards": shards,
        }
    meta = {
        "format": FORMAT, "version": VERSION, "tokenizer": tokenizer.name,
        "tokenizer_sha256": tokenizer_sha, "vocab_size": int(tokenizer.vocab_size),
        "dtype": token_dtype(tokenizer.vocab_size).name, "eot_id": int(tokenizer.eot_id),
        "splits": splits, "stats": result.stats.as_dict(), "settings": asdict(settings),
    }  # fmt: skip
    write_json_atomic(out / MANIFEST, meta)
    keep = shard_files(out, meta)
    stale = shard_files(out, old) - keep if old is not None else set()
    stale |= {p for p in out.iterdir() if _SHARD_FILE.match(p.name) and p not in keep}
    for p in stale:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return meta


__all__ = [
    "Plan", "RunResult", "Settings", "ShardJob", "Unit", "WorkerContext", "bin_path",
    "build_shard", "doc_hash", "execute", "idx_path", "plan", "plan_units", "record_identity",
    "remove_temporaries", "run_jobs", "split_documents", "write_manifest",
]  # fmt: skip

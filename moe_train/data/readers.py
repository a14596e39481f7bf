"""What `moe-train-prepare` reads: inputs expanded into files, files into records of text.

Kinds, by suffix (after an optional `.gz` or `.zst` compression suffix):

    .jsonl .ndjson .json   JSON Lines (one record per line), or a JSON array of records when
                           the file's first character is `[` (read incrementally)
    .parquet               Apache Parquet, read by row groups (pyarrow)
    .arrow                 Arrow IPC files, as in a Hugging Face `datasets` folder
    .csv .tsv              through Hugging Face `datasets.load_dataset` (streaming)
    anything else          a plain text file: one document (binary files are skipped)

A folder written by `datasets`' `save_to_disk` (a `Dataset`: `state.json` + `dataset_info.json`;
or a `DatasetDict`: `dataset_dict.json` + one folder per split) is read as its Arrow files.

A record's text is the field `text_field` names (a dotted path for nested records:
`meta.content`). Every record has an identity, its file's key (its path relative to the input:
a folder, a glob's fixed prefix or the file's own folder) and its index in that file (line number
- 1 for JSON Lines, element for arrays, row for tables); the train/val split hashes it, so it does
not depend on where the corpus lives, and adding files never moves existing records.

Bad input raises DataError naming the file (and line or row) and the fix. With `skip_bad`, a
line that is not JSON and a record without a string text are counted and skipped instead.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .tokens import DataError

DATA_EXTRA = 'pip install "moe-train[data]"'
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_KINDS = ("parquet", "arrow", "csv", "tsv")
BINARY_SNIFF = 8192  # a NUL byte in a plain file's first 8 KiB marks it as binary: skipped
_GLOB_MAGIC = set("*?[")
_READ = 1 << 20  # bytes per read of a compressed or JSON-array stream
_ROWS = 1024  # rows per batch of a table
MAX_JSON_ELEMENT = 256 << 20  # characters buffered for one element of a JSON array


@dataclass(frozen=True)
class InputFile:
    """One file to read. key: its path relative to its input, '/'-separated (what the split
    hashes); kind: text | json | parquet | arrow | csv | tsv; compression: None | gzip | zstd."""

    key: str
    path: Path
    kind: str
    compression: str | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class ReadStats:
    """What reading found, summed over files (and workers)."""

    records: int = 0  # records seen (documents, empty ones and bad ones)
    empty: int = 0  # records whose text is empty or only whitespace: skipped
    bad_json: int = 0  # lines that are not JSON, skipped (skip_bad)
    bad_text: int = 0  # records without the text field or with a non-string one (skip_bad)
    binary_files: list[str] = field(default_factory=list)  # plain files skipped as binary

    def add(self, other: ReadStats) -> None:
        self.records += other.records
        self.empty += other.empty
        self.bad_json += other.bad_json
        self.bad_text += other.bad_text
        self.binary_files += other.binary_files

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "empty": self.empty,
            "bad_json": self.bad_json,
            "bad_text": self.bad_text,
            "binary_files": len(self.binary_files),
        }


def need(module: str) -> Any:
    """Import an optional dependency of the `data` extra, or fail saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"reading this input needs `{module.split('.')[0]}`: {DATA_EXTRA}") from e


def kind_of(path: Path) -> tuple[str, str | None]:
    """(kind, compression) from a file name: `a.jsonl.zst` -> ("json", "zstd")."""
    name = path.name.lower()
    compression = None
    for suffix, comp in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    inner = Path(name).suffix
    if inner in JSON_SUFFIXES:
        return "json", compression
    if inner in (".parquet", ".arrow") and compression:
        raise DataError(f"{path}: a compressed {inner} file; decompress it first")
    if inner in (".parquet", ".arrow", ".csv", ".tsv"):
        return inner[1:], compression
    return "text", compression


# -- discovery ---------------------------------------------------------------------------------


def datasets_arrow_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `datasets` save_to_disk folder, in order; None if it is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{folder}/dataset_dict.json cannot be read ({e})") from None
        files: list[Path] = []
        for split in splits:
            found = datasets_arrow_files(folder / str(split))
            if found is None:
                raise DataError(
                    f"{folder}: dataset_dict.json lists split {split!r}, but {folder / split} "
                    "is not a saved dataset (no state.json); re-save it with save_to_disk"
                )
            files += found
        return files
    if not ((folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}/state.json cannot be read as a datasets state ({e})") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: the saved dataset lacks {missing[0]}; re-save it")
    return [folder / n for n in names]


def _is_hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in Path(rel).parts)


def _walk(root: Path, base: Path) -> Iterator[tuple[str, Path, bool]]:
    """(key, path, from_datasets_folder) of every file under root, hidden entries skipped."""
    arrow = datasets_arrow_files(root)
    if arrow is not None:
        yield from ((p.relative_to(base).as_posix(), p, True) for p in arrow)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(x for x in dirnames if not x.startswith(".")):
            sub = datasets_arrow_files(here / d)
            if sub is None:
                keep.append(d)
            else:
                yield from ((p.relative_to(base).as_posix(), p, True) for p in sub)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not name.startswith("."):
                yield (here / name).relative_to(base).as_posix(), here / name, False


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: `data/**/*.txt` -> `data`."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if _GLOB_MAGIC & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def discover(
    inputs: Sequence[str],
    extensions: Sequence[str] | None = None,
    exclude: Path | None = None,
) -> list[InputFile]:
    """Files, folders (recursive, hidden entries skipped) and globs -> input files sorted by key.
    `extensions` (e.g. ['.jsonl', '.txt']) keeps only files with those suffixes (a datasets
    folder is always read whole); files under `exclude` (the output folder) are left out."""
    found: dict[Path, InputFile] = {}
    for item in inputs:
        path = Path(item)
        if path.is_file():
            entries: Iterator[tuple[str, Path, bool]] = iter([(path.name, path, False)])
        elif path.is_dir():
            entries = _walk(path, path)
        elif _GLOB_MAGIC & set(item):
            base = _glob_base(item)
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"input glob {item!r} matches no files; check the pattern")
            entries = (
                e
                for m in matches
                for e in (
                    [(Path(m).relative_to(base).as_posix(), Path(m), False)]
                    if Path(m).is_file()
                    else _walk(Path(m), base)
                )
                if not _is_hidden(e[0])
            )
        else:
            raise DataError(f"input {item!r} does not exist (expected a file, a folder or a glob)")
        for key, p, in_dataset in entries:
            if exclude is not None and exclude in p.resolve().parents:
                continue
            if extensions and not in_dataset and not any(p.name.endswith(e) for e in extensions):
                continue
            kind, compression = ("arrow", None) if in_dataset else kind_of(p)
            found.setdefault(p.resolve(), InputFile(key, p, kind, compression))
    return sorted(found.values(), key=lambda f: (f.key, str(f.path)))


def looks_binary(f: InputFile) -> bool:
    """A NUL byte in the first 8 KiB (decompressed) of a plain file."""
    try:
        with open_bytes(f) as stream:
            return b"\0" in stream.read(BINARY_SNIFF)
    except DataError:
        return False  # a truncated stream fails later, with its own message


# -- byte streams --------------------------------------------------------------------------------


class _CountingFile(io.RawIOBase):
    """A file that tells `on_read(n)` how many of its (on-disk) bytes were read."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None] | None) -> None:
        self.f, self.on_read = f, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)  # type: ignore[attr-defined]
        if n and self.on_read is not None:
            self.on_read(n)
        return n or 0

    def close(self) -> None:
        self.f.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Zstandard frames one after another, decompressed; raises DataError when the input ends
    inside a frame (zstandard's own stream reader returns a truncated file's head silently)."""

    def __init__(self, raw: BinaryIO, path: Path) -> None:
        self.raw, self.path = raw, path
        self.zstd = need("zstandard")
        self.dctx = self.zstd.ZstdDecompressor()
        self.dobj = self.dctx.decompressobj()
        self.pending = b""
        self.in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.pending:
            chunk = self.raw.read(_READ)
            if not chunk:
                if self.in_frame:
                    raise DataError(
                        f"{self.path}: the zstd stream ends inside a frame: the file is truncated "
                        "or corrupt; download or compress it again"
                    )
                return 0
            out, data = [], chunk
            try:
                while data:
                    out.append(self.dobj.decompress(data))
                    if self.dobj.eof:  # a frame ended: what follows starts the next one
                        data, self.in_frame = self.dobj.unused_data, False
                        self.dobj = self.dctx.decompressobj()
                    else:
                        data, self.in_frame = b"", True
            except self.zstd.ZstdError as e:
                raise DataError(f"{self.path}: not a valid zstd stream ({e})") from None
            self.pending = b"".join(out)
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _GzipErrors(io.RawIOBase):
    """gzip's EOFError and BadGzipFile as DataError naming the file."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self.stream, self.path = stream, path

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            return self.stream.readinto(b)  # type: ignore[attr-defined]
        except EOFError:
            raise DataError(
                f"{self.path}: the gzip stream ends early: the file is truncated; download or "
                "compress it again"
            ) from None
        except (gzip.BadGzipFile, OSError) as e:
            raise DataError(f"{self.path}: not a valid gzip file ({e})") from None

    def close(self) -> None:
        self.stream.close()
        super().close()


def open_bytes(f: InputFile, on_read: Callable[[int], None] | None = None) -> io.BufferedReader:
    """The file's decompressed bytes as a buffered stream; on_read counts on-disk bytes."""
    raw: BinaryIO = _CountingFile(open(f.path, "rb"), on_read)  # type: ignore[assignment]
    if f.compression == "gzip":
        raw = _GzipErrors(gzip.GzipFile(fileobj=raw, mode="rb"), f.path)  # type: ignore
    elif f.compression == "zstd":
        raw = _ZstdReader(raw, f.path)  # type: ignore[assignment]
    return io.BufferedReader(raw, buffer_size=_READ)  # type: ignore[arg-type]


# -- records -------------------------------------------------------------------------------------


class TextField:
    """A dotted path into a record (`text`, `meta.content`) and what happens when it is not a
    string: DataError, or counted in `stats` and skipped (skip_bad)."""

    def __init__(self, spec: str, skip_bad: bool, stats: ReadStats) -> None:
        if not spec or any(not p for p in spec.split(".")):
            raise DataError(f"--text-field {spec!r}: give a field name or a dotted path (a.b)")
        self.spec, self.path = spec, tuple(spec.split("."))
        self.skip_bad, self.stats = skip_bad, stats

    @property
    def column(self) -> str:
        return self.path[0]

    def text(self, record: Any, where: str) -> str | None:
        """The record's text, or None when it is skipped (counted)."""
        value = record
        for depth, key in enumerate(self.path):
            if not isinstance(value, dict) or key not in value:
                self._bad(where, self._missing(value, depth))
                return None
            value = value[key]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            self._bad(where, f"its field {self.spec!r} is {kind}, not a string")
            return None
        return value

    def _missing(self, value: Any, depth: int) -> str:
        at = ".".join(self.path[:depth]) or "the record"
        if not isinstance(value, dict):
            return f"{at} is {type(value).__name__}, not an object with field {self.path[depth]!r}"
        keys = ", ".join(sorted(map(str, value))[:12]) or "none"
        return f"{at} has no field {self.path[depth]!r} (its fields: {keys})"

    def _bad(self, where: str, what: str) -> None:
        if self.skip_bad:
            self.stats.bad_text += 1
            return None
        raise DataError(
            f"{where}: {what}; choose the text with --text-field (a dotted path for nested "
            "records, e.g. meta.text), or pass --skip-bad to count and skip such records"
        )


Record = tuple[int, str]  # (index in its file, text)


def _bad_json(where: str, e: Exception, skip_bad: bool, stats: ReadStats) -> None:
    if not skip_bad:
        raise DataError(
            f"{where}: not valid JSON ({e}); fix or remove the line, or pass --skip-bad to "
            "count and skip such lines"
        ) from None
    stats.bad_json += 1


def json_records(
    f: InputFile, field_: TextField, on_read: Callable[[int], None] | None = None
) -> Iterator[Record]:
    """JSON Lines (index = line number - 1; blank lines are not records) or a JSON array."""
    with open_bytes(f, on_read) as stream:
        head = stream.peek(64).lstrip()
        if head[:1] == b"[":
            yield from _json_array(stream, f, field_)
            return
        for i, line in enumerate(stream):
            if not line.strip():
                continue
            where = f"{f.path}:{i + 1}"
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                _bad_json(where, e, field_.skip_bad, field_.stats)
                field_.stats.records += 1
                continue
            text = field_.text(record, where)
            field_.stats.records += 1
            if text is not None:
                yield i, text


class _TextBuffer:
    """A window onto a text stream for the incremental JSON array reader: `buf[pos:]` is what is
    not consumed yet; `line` is the line number of `buf[0]`."""

    def __init__(self, text: io.TextIOWrapper, path: Path) -> None:
        self.text, self.path = text, path
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def fill(self) -> bool:
        """Read more (dropping what is consumed); False at the end of the stream."""
        if self.eof:
            return False
        self.line += self.buf.count("\n", 0, self.pos)
        chunk = self.text.read(max(_READ, len(self.buf)))
        self.buf, self.pos, self.eof = self.buf[self.pos :] + chunk, 0, not chunk
        if len(self.buf) > MAX_JSON_ELEMENT:
            raise DataError(
                f"{self.where()}: a JSON array element over {MAX_JSON_ELEMENT >> 20} MiB, or "
                "malformed JSON; fix the file or write it as JSON Lines"
            )
        return bool(chunk)

    def peek(self) -> str:
        """The next character that is not whitespace ('' at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def where(self) -> str:
        return f"{self.path}:{self.line + self.buf.count(chr(10), 0, self.pos)}"


def _json_array(stream: io.BufferedReader, f: InputFile, field_: TextField) -> Iterator[Record]:
    """The elements of a JSON array, decoded one at a time (memory: one element + one read)."""
    decoder = json.JSONDecoder()
    b = _TextBuffer(io.TextIOWrapper(stream, encoding="utf-8", errors="replace"), f.path)
    b.peek()
    b.pos += 1  # the '['
    index = 0
    if b.peek() == "]":
        return
    while True:
        while True:
            try:
                record, end = decoder.raw_decode(b.buf, b.pos)
                break
            except ValueError as e:
                if not b.fill():
                    raise DataError(
                        f"{b.where()}: element {index} of the JSON array is not valid JSON ({e}); "
                        "fix the file (--skip-bad cannot resynchronise inside an array)"
                    ) from None
        field_.stats.records += 1
        value = field_.text(record, f"{f.path}: element {index}")
        if value is not None:
            yield index, value
        index += 1
        b.pos = end
        c = b.peek()
        if c == "]":
            return
        if c != ",":
            what = "the file ends" if c == "" else f"found {c!r}"
            raise DataError(
                f"{b.where()}: expected ',' or ']' after element {index - 1} of the JSON array, "
                f"{what} (truncated or malformed)"
            )
        b.pos += 1
        if b.peek() == "":
            raise DataError(f"{b.where()}: the JSON array ends after a ',' (truncated)")


def parquet_units(f: InputFile, column: str) -> list[tuple[int, int, int]]:
    """(row group, first row, on-disk bytes) of a Parquet file; checks the column is there."""
    pq = need("pyarrow.parquet")
    try:
        meta = pq.ParquetFile(f.path).metadata
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors
        raise DataError(f"{f.path}: not a readable Parquet file ({e})") from None
    names = meta.schema.to_arrow_schema().names
    if column not in names:
        raise DataError(
            f"{f.path}: the Parquet file has no column {column!r} (its columns: "
            f"{', '.join(names)}); choose one with --text-field"
        )
    out, first = [], 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        nbytes = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        out.append((g, first, nbytes))
        first += rg.num_rows
    return out


def _table_rows(batches: Iterator[Any], first: int, f: InputFile, field_: TextField, on_rows):
    index = first
    top = field_.column
    nested = len(field_.path) > 1
    for batch in batches:
        values = batch.column(batch.schema.get_field_index(top)).to_pylist()
        for value in values:
            field_.stats.records += 1
            record = {top: value} if nested or not isinstance(value, str) else None
            text = value if record is None else field_.text(record, f"{f.path}: row {index}")
            if text is not None:
                yield index, text
            index += 1
        if on_rows is not None:
            on_rows(len(values))


def parquet_records(
    f: InputFile, group: int, first: int, field_: TextField, on_rows=None
) -> Iterator[Record]:
    """The rows of one row group (index = row in the file)."""
    pq = need("pyarrow.parquet")
    pf = pq.ParquetFile(f.path)
    batches = pf.iter_batches(batch_size=_ROWS, row_groups=[group], columns=[field_.column])
    yield from _table_rows(batches, first, f, field_, on_rows)


def _arrow_reader(path: Path) -> Any:
    pa = need("pyarrow")
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source)


def arrow_check(f: InputFile, column: str) -> None:
    """The Arrow file opens and has the column."""
    try:
        names = _arrow_reader(f.path).schema.names
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors
        raise DataError(f"{f.path}: not a readable Arrow file ({e})") from None
    if column not in names:
        raise DataError(
            f"{f.path}: the Arrow table has no column {column!r} (its columns: "
            f"{', '.join(names)}); choose one with --text-field"
        )


def arrow_records(f: InputFile, field_: TextField, on_rows=None) -> Iterator[Record]:
    """The rows of an Arrow IPC file (stream or file format), index = row."""
    reader = _arrow_reader(f.path)
    if hasattr(reader, "num_record_batches"):
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    yield from _table_rows(batches, 0, f, field_, on_rows)


def csv_records(f: InputFile, field_: TextField) -> Iterator[Record]:
    """Rows of a .csv/.tsv through `datasets.load_dataset` (streaming: memory stays flat)."""
    datasets = need("datasets")
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    kwargs = {"delimiter": "\t"} if f.kind == "tsv" else {}
    try:
        rows = datasets.load_dataset(
            "csv", data_files=str(f.path), split="train", streaming=True, **kwargs
        )
        for index, row in enumerate(rows):
            field_.stats.records += 1
            text = field_.text(row, f"{f.path}: row {index}")
            if text is not None:
                yield index, text
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's parse errors
        raise DataError(f"{f.path}: datasets cannot read it as {f.kind} ({e})") from None


def text_chunks(
    f: InputFile, chunk_bytes: int, on_read=None, lo: int = 0, hi: int | None = None
) -> Iterator[bytes]:
    """A plain file's bytes [lo, hi) (decompressed) in chunks of about chunk_bytes, each cut
    after its last newline when it has one (so a tokenizer never sees a word split)."""
    rest, pos = b"", 0
    with open_bytes(f, on_read) as stream:
        while block := stream.read(chunk_bytes):
            start, pos = pos, pos + len(block)
            if hi is not None and start >= hi:
                break
            block = block[max(0, lo - start) : None if hi is None else hi - start]
            block = rest + block
            cut = block.rfind(b"\n") + 1
            rest, block = (block[cut:], block[:cut]) if cut else (b"", block)
            if block:
                yield block
    if rest:
        yield rest

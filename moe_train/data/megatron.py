"""Megatron-LM indexed datasets (`NAME.bin` + `NAME.idx`): read in place, and written by
`moe-train-prepare` (its shards use the same layout, so Megatron reads them too).

`NAME.bin` is the flat token stream, no header, in the dtype the index names. `NAME.idx`, all
little-endian (Megatron-Core's `megatron/core/datasets/indexed_dataset.py`, version 1):

    offset  size        field
    0       9           magic b"MMIDIDX\\x00\\x00"
    9       8           version, uint64 = 1
    17      1           dtype code, uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
                        (6 float64 and 7 float32 exist in Megatron; token ids are not floats)
    18      8           S = sequence count, uint64
    26      8           D = document count + 1, uint64
    34      4 S         sequence lengths, int32 (tokens)
    34+4S   8 S         sequence pointers, int64 (byte offsets into the .bin)
    34+12S  8 D         document indices, int64: document d is sequences [idx[d], idx[d+1]);
                        idx[0] = 0 and idx[D-1] = S
    34+12S+8D  S        sequence modes, int8 (multimodal datasets only; ignored here)

A document is usually one sequence (`preprocess_data.py` without --split-sentences); moe-train
writes one sequence per document (several when a document exceeds 2^31 - 1 tokens). The
sequences are contiguous (pointer[i+1] = pointer[i] + length[i] * itemsize, as both writers make
them), so the .bin reads as one token stream and document d starts at token
pointer[idx[d]] / itemsize. `IndexedTokens` checks all of this when it opens a pair and raises
`DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .tokens import DataError, temp_name

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34
DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 8: "uint16"}
CODE_OF = {name: code for code, name in DTYPE_CODES.items()}
FLOAT_CODES = {6: "float64", 7: "float32"}
MAX_SEQUENCE = (1 << 31) - 1  # sequence lengths are int32
_CHECK_BLOCK = 1 << 22  # index entries per block of the consistency checks
_WRITE_BLOCK = 1 << 20  # bytes buffered before the .bin write


def bin_path(prefix: str | os.PathLike[str]) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike[str]) -> Path:
    return Path(f"{prefix}.idx")


def is_indexed_prefix(prefix: str | os.PathLike[str]) -> bool:
    """A `.idx` (and `.bin`) exist for this prefix."""
    return idx_path(prefix).is_file() and bin_path(prefix).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (Megatron's choice; it has no uint32 code)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class IndexedTokens:
    """A validated Megatron `.bin`/`.idx` pair, memory-mapped (nothing copied or converted).

    tokens: [num_tokens] memmap of the .bin; doc_starts_between(lo, hi): the token positions in
    [lo, hi) where a document starts; num_documents; dtype.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = str(prefix)
        self.idx, self.bin = idx_path(prefix), bin_path(prefix)
        for p in (self.idx, self.bin):
            if not p.is_file():
                raise DataError(
                    f"Megatron dataset {self.prefix}: {p} not found; a Megatron dataset is a "
                    "NAME.bin + NAME.idx pair (give data.dir=path/NAME, without the suffix)"
                )
        self._read_header()
        raw = np.memmap(self.idx, dtype=np.uint8, mode="r")
        s, d = self.num_sequences, self.doc_count
        self.lengths = raw[HEADER_BYTES : HEADER_BYTES + 4 * s].view("<i4")  # [S]
        self.pointers = raw[HEADER_BYTES + 4 * s : HEADER_BYTES + 12 * s].view("<i8")  # [S]
        self.doc_index = raw[HEADER_BYTES + 12 * s : HEADER_BYTES + 12 * s + 8 * d].view("<i8")
        self._check_index()
        self.num_tokens = self.bin.stat().st_size // self.dtype.itemsize
        self._check_bin()
        self.tokens: np.ndarray = (
            np.memmap(self.bin, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.zeros(0, dtype=self.dtype)
        )

    @property
    def num_documents(self) -> int:
        return self.doc_count - 1

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"IndexedTokens({self.prefix!r}, num_tokens={self.num_tokens}, "
            f"num_documents={self.num_documents}, dtype={self.dtype.name})"
        )

    def _fail(self, what: str, fix: str | None = None) -> DataError:
        fix = fix or (
            "the pair is corrupt or its files do not belong together; re-create it (Megatron's "
            "tools/preprocess_data.py, or moe-train-prepare)"
        )
        return DataError(f"Megatron index {self.idx}: {what}; {fix}")

    def _read_header(self) -> None:
        size = self.idx.stat().st_size
        with open(self.idx, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise self._fail(
                f"does not start with Megatron's header {MAGIC!r} ({size} bytes)",
                "it is not a Megatron .idx file, or it is truncated",
            )
        version, code = struct.unpack("<QB", head[9:18])
        if version != VERSION:
            raise self._fail(f"format version {version}; this reader knows version {VERSION}")
        if code in FLOAT_CODES:
            raise self._fail(f"holds {FLOAT_CODES[code]} values, not token ids", "tokenize it")
        if code not in DTYPE_CODES:
            raise self._fail(f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        self.num_sequences, self.doc_count = struct.unpack("<QQ", head[18:34])
        plain = HEADER_BYTES + 12 * self.num_sequences + 8 * self.doc_count
        if size not in (plain, plain + self.num_sequences):  # + one int8 mode per sequence
            raise self._fail(
                f"is {size} bytes, but its header describes {self.num_sequences} sequences and "
                f"{self.doc_count - 1} documents ({plain} bytes): it is truncated or corrupt"
            )
        if self.doc_count < 1:
            raise self._fail("has no document index (document count 0)")

    def _check_index(self) -> None:
        """Document indices start at 0, never decrease and end at S; sequences are contiguous.
        One pass in blocks (12 bytes per sequence: small next to the tokens)."""
        s, di, item = self.num_sequences, self.doc_index, self.dtype.itemsize
        if di[0] != 0 or di[-1] != s:
            raise self._fail(
                f"document indices run from {int(di[0])} to {int(di[-1])}; they must run from "
                f"0 to the sequence count {s}"
            )
        for lo in range(0, len(di), _CHECK_BLOCK):
            block = np.asarray(di[lo : lo + _CHECK_BLOCK + 1])
            if (np.diff(block) < 0).any():
                raise self._fail(f"document indices decrease near document {lo}")
        if s and self.pointers[0] != 0:
            raise self._fail(f"its first sequence starts at byte {int(self.pointers[0])}, not 0")
        for lo in range(0, s, _CHECK_BLOCK):
            lengths = np.asarray(self.lengths[lo : lo + _CHECK_BLOCK], dtype=np.int64)
            ptr = np.asarray(self.pointers[lo : lo + _CHECK_BLOCK + 1])
            if (lengths < 0).any():
                raise self._fail(f"a negative sequence length near sequence {lo}")
            step = np.diff(ptr)
            if (step != lengths[: len(step)] * item).any():
                i = lo + int(np.argmax(step != lengths[: len(step)] * item))
                raise self._fail(
                    f"sequence {i + 1} starts at byte {int(ptr[i + 1 - lo])}, not right after "
                    f"sequence {i} (byte {int(ptr[i - lo])} + {int(lengths[i - lo])} tokens); "
                    "moe-train reads contiguous sequences only"
                )

    def _check_bin(self) -> None:
        size, item = self.bin.stat().st_size, self.dtype.itemsize
        end = int(self.pointers[-1]) + int(self.lengths[-1]) * item if self.num_sequences else 0
        if size != end:
            raise self._fail(
                f"describes {end} bytes of {self.dtype.name} tokens, but {self.bin} holds {size}: "
                "the .bin and the .idx do not belong together (or one of them is truncated)"
            )

    def doc_starts_between(self, lo: int, hi: int) -> np.ndarray:
        """[k] int64 token positions p with lo <= p < hi where a document starts (sorted)."""
        item, s = self.dtype.itemsize, self.num_sequences
        if s == 0 or hi <= lo:
            return np.zeros(0, dtype=np.int64)
        seq_lo = int(np.searchsorted(self.pointers, lo * item, "left"))
        seq_hi = int(np.searchsorted(self.pointers, hi * item, "left"))
        d_lo = int(np.searchsorted(self.doc_index, seq_lo, "left"))
        d_hi = int(np.searchsorted(self.doc_index, seq_hi, "left"))
        seqs = np.asarray(self.doc_index[d_lo:d_hi])
        seqs = seqs[seqs < s]
        return np.unique(np.asarray(self.pointers[seqs], dtype=np.int64) // item)

    def document_token_start(self, d: int) -> int:
        """The token position where document d (0 <= d <= num_documents) starts (d =
        num_documents: the end)."""
        seq = int(self.doc_index[d])
        if seq >= self.num_sequences:
            return self.num_tokens
        return int(self.pointers[seq]) // self.dtype.itemsize

    def max_token(self) -> int:
        """The largest id, one pass in blocks (memory stays flat); -1 when empty."""
        from .tokens import max_token_id

        return max_token_id(self.tokens) if self.num_tokens else -1


class IndexedWriter:
    """Streams documents into `prefix.bin` + `prefix.idx` (Megatron's layout) under temporary
    names; `finish()` writes the index and renames both into place, `abort()` removes them. The
    CRC-32 and size of both files are known after finish (`crc32`, `nbytes`: {"bin", "idx"}).

        w = IndexedWriter(out / "train-00000", np.dtype("uint16"))
        w.add(tokens); w.end_document()   # tokens: [n] ids; a document may take several add()s
        w.finish()
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype.name not in CODE_OF:
            raise ValueError(f"no Megatron dtype code for {self.dtype.name}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = temp_name(bin_path(prefix))
        self._idx_tmp = temp_name(idx_path(prefix))
        self._bin: Any = open(self._bin_tmp, "xb")
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._crc = 0
        self.num_tokens = 0
        self.max_token = -1
        self._seq_lengths = array("q")  # tokens per sequence
        self._doc_index = array("q", [0])  # first sequence of every document, then S
        self._open_doc = 0  # tokens of the current document's current sequence
        self.crc32: dict[str, str] = {}
        self.nbytes: dict[str, int] = {}

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens ([n] integers) to the current document."""
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.max_token = max(self.max_token, int(tokens.max()))
        raw = data.tobytes()
        self._crc = zlib.crc32(raw, self._crc)
        self._buffer.append(raw)
        self._buffered += len(raw)
        if self._buffered >= _WRITE_BLOCK:
            self._flush()
        self.num_tokens += data.size
        room = MAX_SEQUENCE - self._open_doc
        n = data.size
        while n > room:  # a document over 2^31 - 1 tokens: more sequences
            self._seq_lengths.append(self._open_doc + room)
            n -= room
            self._open_doc, room = 0, MAX_SEQUENCE
        self._open_doc += n

    def end_document(self) -> None:
        """Close the current document (an empty one is dropped)."""
        if self._open_doc:
            self._seq_lengths.append(self._open_doc)
            self._open_doc = 0
        if len(self._seq_lengths) > self._doc_index[-1]:
            self._doc_index.append(len(self._seq_lengths))

    def _flush(self) -> None:
        self._bin.write(b"".join(self._buffer))
        self._buffer, self._buffered = [], 0

    def finish(self) -> None:
        """Write the index, fsync both files and rename them into place."""
        self.end_document()
        self._flush()
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        index = index_bytes(self.dtype, self._seq_lengths, self._doc_index)
        with open(self._idx_tmp, "xb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        self.crc32 = {"bin": f"{self._crc:08x}", "idx": f"{zlib.crc32(index):08x}"}
        self.nbytes = {"bin": self.num_tokens * self.dtype.itemsize, "idx": len(index)}
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        """Remove the temporaries (nothing half-written stays behind)."""
        if not self._bin.closed:
            self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def index_bytes(dtype: np.dtype, seq_lengths: Sequence[int], doc_index: Sequence[int]) -> bytes:
    """The .idx file of contiguous sequences of these lengths, documents at these indices."""
    lengths = np.asarray(seq_lengths, dtype="<i4")
    pointers = np.zeros(len(lengths), dtype="<i8")
    if len(lengths):
        pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * np.dtype(dtype).itemsize
    head = MAGIC + struct.pack("<QB", VERSION, CODE_OF[np.dtype(dtype).name])
    head += struct.pack("<QQ", len(lengths), len(doc_index))
    docs = np.asarray(doc_index, dtype="<i8")
    return head + lengths.tobytes() + pointers.tobytes() + docs.tobytes()

"""Token files: a flat memmap `<name>.bin` plus a JSON sidecar `<name>.json`.

The nanoGPT/Megatron convention: the `.bin` holds the raw tokens, little-endian uint16 (uint32
when the vocabulary has more than 65536 entries), with no header. The sidecar says how to read it:

    {"version": 1, "vocab_size": 256, "dtype": "uint16", "tokenizer": "bytes", "num_tokens": N,
     "max_token": 255}

`tokenizer` is `bytes` or the name of a tokenizer file in the same folder (`tokenizer.json`, Hugging
Face `tokenizers` format); `max_token` (the largest id in the file) lets training check the data
against `model.vocab_size` without reading it. A nanoGPT folder (`train.bin`/`val.bin` of uint16,
no sidecar) opens when the vocabulary size is given (`TokenFile(path, vocab_size=N)`); its largest
id is then found by one vectorised pass over the file.

Writes are atomic (temporary name, then rename), and `TokenFile` checks everything it can cheaply,
raising `DataError` with a message that names the file and says how to fix it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

FORMAT_VERSION = 1
DTYPES = ("uint16", "uint32")
FIX_HINT = "re-create it with `moe-train-prepare` (see `moe-train-prepare --help`)"
_SAMPLE_BLOCK = 1 << 16  # tokens read per checked block
_SAMPLE_BLOCKS = 8  # blocks checked for out-of-vocabulary tokens, besides the first and last
_SCAN_BLOCK = 1 << 24  # tokens per block of the full max-id scan


class DataError(ValueError):
    """A token file (or data folder) is missing, corrupt or unusable. The message says what to do."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """`train.bin` -> `train.json`."""
    return Path(path).with_suffix(".json")


class TokenWriter:
    """Streams tokens into `<path>` under a temporary name; on a clean exit writes the sidecar and
    renames both into place, on an error removes the temporaries.

        with TokenWriter(out / "train.bin", vocab_size=256, tokenizer="bytes") as w:
            w.write(chunk)  # chunk: [n] integer array
    """

    def __init__(self, path: str | os.PathLike[str], vocab_size: int, tokenizer: str) -> None:
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.tokenizer = tokenizer
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.num_tokens = 0
        self.max_token = -1  # largest id written so far
        self._file: Any = None
        self._tmp: Path | None = None

    def __enter__(self) -> TokenWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_name(self.path)
        self._file = open(self._tmp, "xb")  # closed in __exit__
        return self

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens ([n] integers in [0, vocab_size))."""
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(
                f"{self.path}: token ids must be in [0, {self.vocab_size}), "
                f"got range [{tokens.min()}, {tokens.max()}]"
            )
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).tobytes())
        self.num_tokens += int(tokens.size)
        self.max_token = max(self.max_token, int(tokens.max()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tmp is not None
        ok = exc_type is None
        try:
            if ok:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if ok:
                meta = {
                    "version": FORMAT_VERSION,
                    "vocab_size": self.vocab_size,
                    "dtype": self.dtype.name,
                    "tokenizer": self.tokenizer,
                    "num_tokens": self.num_tokens,
                    "max_token": self.max_token,  # -1 when empty
                }
                _atomic_write_text(sidecar_path(self.path), json.dumps(meta, indent=1) + "\n")
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()


def write_tokens(
    path: str | os.PathLike[str], array: np.ndarray, vocab_size: int, tokenizer: str
) -> Path:
    """Write `array` ([n] token ids) to `path` (.bin) and its sidecar, atomically. Returns path."""
    with TokenWriter(path, vocab_size, tokenizer) as w:
        w.write(np.asarray(array).reshape(-1))
    return Path(path)


def temp_name(path: Path) -> Path:
    """A unique hidden sibling of `path` (created with the usual umask, unlike mkstemp's 0600)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def max_token_id(tokens: np.ndarray) -> int:
    """The largest id in `tokens` ([n], e.g. a memmap), in blocks (memory stays flat); -1 if empty."""
    hi = -1
    for s in range(0, len(tokens), _SCAN_BLOCK):
        hi = max(hi, int(tokens[s : s + _SCAN_BLOCK].max()))
    return hi


class TokenFile:
    """A validated, read-only memmap of a token file.

    `tokens` is the [num_tokens] array (np.memmap); `len(tf)` is num_tokens. `vocab_size` opens a
    file without a sidecar as nanoGPT's raw uint16 (`tokenizer` is then "unknown").
    """

    def __init__(self, path: str | os.PathLike[str], vocab_size: int | None = None) -> None:
        self.path = Path(path)
        meta = self._read_sidecar(vocab_size)
        self.vocab_size: int = meta["vocab_size"]
        self.dtype: np.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.tokenizer: str = meta["tokenizer"]
        self.num_tokens: int = meta["num_tokens"]
        self.has_sidecar: bool = "raw" not in meta
        self._max_token: int | None = meta.get("max_token")
        self.tokens: np.ndarray = self._open()
        self._check_sample()

    @property
    def max_token(self) -> int:
        """The largest token id: from the sidecar, else one full pass over the file (cached)."""
        if self._max_token is None:
            self._max_token = max_token_id(self.tokens)
        return self._max_token

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.path)!r}, num_tokens={self.num_tokens}, "
            f"vocab_size={self.vocab_size}, dtype={self.dtype.name})"
        )

    def _fail(self, what: str, fix: str = FIX_HINT) -> DataError:
        return DataError(f"token file {self.path}: {what}; {fix}")

    def _read_sidecar(self, vocab_size: int | None) -> dict[str, Any]:
        if not self.path.is_file():
            raise self._fail(
                "file not found",
                "check the path (data.dir should hold train.bin and val.bin) "
                "or create it with `moe-train-prepare`",
            )
        side = sidecar_path(self.path)
        if not side.is_file():
            if vocab_size is not None:
                return self._raw_meta(vocab_size)
            raise self._fail(
                f"its metadata file {side} is missing (a nanoGPT folder of raw uint16 tokens "
                "opens when you give its vocabulary size: model.vocab_size=N)"
            )
        try:
            meta = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"its metadata file {side} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise self._fail(f"its metadata file {side} must hold a JSON object")
        for key, kind in (("vocab_size", int), ("dtype", str), ("num_tokens", int)):
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                raise self._fail(f"{side} needs `{key}` ({kind.__name__}), got {meta.get(key)!r}")
        meta.setdefault("tokenizer", "unknown")
        if meta.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise self._fail(
                f"{side} has format version {meta.get('version')!r}, this moe-train reads "
                f"version {FORMAT_VERSION}"
            )
        if meta["dtype"] not in DTYPES:
            raise self._fail(f"{side} has dtype {meta['dtype']!r}; allowed: {', '.join(DTYPES)}")
        if meta["vocab_size"] <= 0 or meta["num_tokens"] < 0:
            raise self._fail(
                f"{side} has vocab_size {meta['vocab_size']}, "
                f"num_tokens {meta['num_tokens']}; both must be positive"
            )
        if meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1:
            raise self._fail(
                f"{side} says dtype {meta['dtype']} but vocab_size {meta['vocab_size']} "
                "does not fit in it (wrong dtype)"
            )
        hi = meta.get("max_token")
        if hi is not None and (not isinstance(hi, int) or hi >= meta["vocab_size"]):
            raise self._fail(
                f"{side} has max_token {hi!r}, outside the vocabulary [0, {meta['vocab_size']})"
            )
        return meta

    def _raw_meta(self, vocab_size: int) -> dict[str, Any]:
        """nanoGPT's convention: raw little-endian uint16, no sidecar."""
        if not 0 < vocab_size <= 1 << 16:
            raise self._fail(
                f"has no sidecar, so it is read as nanoGPT's raw uint16, which cannot hold a "
                f"vocabulary of {vocab_size}",
                "write a sidecar (moe_train.data.write_tokens) or re-create it with "
                "`moe-train-prepare`",
            )
        size = self.path.stat().st_size
        return {
            "vocab_size": vocab_size,
            "dtype": "uint16",
            "tokenizer": "unknown",
            "num_tokens": size // 2,
            "raw": True,
        }

    def _open(self) -> np.ndarray:
        size = self.path.stat().st_size
        item = self.dtype.itemsize
        if size == 0:
            raise self._fail("file is empty")
        if size % item:
            raise self._fail(
                f"size {size} bytes is not a multiple of {item} ({self.dtype.name}): "
                "the file is truncated or has the wrong dtype"
            )
        if size // item != self.num_tokens:
            raise self._fail(
                f"holds {size // item} {self.dtype.name} tokens but its metadata says "
                f"{self.num_tokens}: the file is truncated, was overwritten, or has the wrong dtype"
            )
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def _check_sample(self) -> None:
        """Out-of-vocabulary check on the first, last and a few evenly spaced blocks."""
        n, b = self.num_tokens, _SAMPLE_BLOCK
        starts = {0, max(0, n - b)} | {
            int(s) for s in np.linspace(0, max(0, n - b), _SAMPLE_BLOCKS)
        }
        for s in sorted(starts):
            block = self.tokens[s : s + b]
            hi = int(block.max())
            if hi >= self.vocab_size:
                pos = s + int(np.argmax(block >= self.vocab_size))
                raise self._fail(
                    f"token {hi} at position {pos} is outside the vocabulary "
                    f"[0, {self.vocab_size}) (wrong dtype or corrupt data)"
                )

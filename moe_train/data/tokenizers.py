"""Tokenizers: bytes (token id = UTF-8 byte value, vocab 256; id 0, NUL, ends a document) and
Hugging Face `tokenizers` files (trained here or brought along).

A data folder names its tokenizer in the token files' sidecars (`"tokenizer"`): `bytes` (the
built-in ByteTokenizer) or the name of a `tokenizer.json` in the same folder. Every tokenizer has
the same face: `name`, `vocab_size`, `eot_id` (the end-of-document token prepare appends after each
document), `encode(text) -> [n] ids`, `decode(ids) -> str`, `token_bytes() -> [V] bytes per token`
(for bits per byte) and `save(folder)`.

    tok = train_bpe(texts, vocab_size=512)       # byte-level BPE, trained offline
    tok = HFTokenizer.from_file("tokenizer.json") # e.g. from a Hugging Face model folder
    tok = load_tokenizer(data_dir, "tokenizer.json")
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .tokens import DataError

TOKENIZER_FILE = "tokenizer.json"
BPE_EOT = "<|endoftext|>"
# end-of-text tokens of common tokenizers, tried in order when a tokenizer.json is brought along
EOT_NAMES = (BPE_EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]", "<|im_end|>")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and the end-of-document token
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class ByteTokenizer:
    """Every byte is a token. `prepare` appends `eot_id` (byte 0, absent from text) after each
    document and drops NUL bytes found inside documents, so 0 always means "end of document"."""

    name = "bytes"
    vocab_size = 256
    eot_id = 0

    def encode(self, text: str | bytes) -> np.ndarray:
        """str (encoded as UTF-8) or bytes -> [n] uint16 token ids."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: np.ndarray | list[int], skip_eot: bool = False) -> str:
        """[n] token ids -> str; invalid UTF-8 becomes U+FFFD. `skip_eot` drops separators."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"byte tokenizer ids must be in [0, 256), got [{arr.min()}, {arr.max()}]"
            )
        arr = arr.astype(np.uint8)
        if skip_eot:
            arr = arr[arr != self.eot_id]
        return arr.tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """[256] bytes per token: 1 each (the end-of-document token stands for its NUL byte)."""
        return np.ones(self.vocab_size, dtype=np.int64)

    def save(self, folder: str | Path) -> None:
        """Nothing to write: the byte tokenizer is built in."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str | bytes) -> np.ndarray: ...
    def decode(self, ids: np.ndarray | list[int], skip_eot: bool = False) -> str: ...
    def token_bytes(self) -> np.ndarray: ...
    def save(self, folder: str | Path) -> None: ...


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise DataError(
            "the Hugging Face `tokenizers` library is needed for BPE tokenizers: "
            "pip install tokenizers (it is a dependency of moe-train: pip install -e .)"
        ) from e
    return tokenizers


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json). `eot_id` is its end-of-text special
    token (one of EOT_NAMES)."""

    name = TOKENIZER_FILE

    def __init__(self, tok: Any, source: str = "<memory>"):
        self.tok, self.source = tok, source
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = self._find_eot()

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DataError(
                f"tokenizer {path} not found: give a tokenizer.json file (Hugging Face "
                "`tokenizers` format) or a folder holding one, or --tokenizer bytes|bpe"
            )
        try:
            tok = _import_tokenizers().Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library's own parse errors
            raise DataError(f"tokenizer {path} cannot be read as a tokenizer.json: {e}") from e
        return cls(tok, str(path))

    def _find_eot(self) -> int:
        for name in EOT_NAMES:
            i = self.tok.token_to_id(name)
            if i is not None:
                return int(i)
        raise DataError(
            f"tokenizer {self.source} has no end-of-text token (looked for {', '.join(EOT_NAMES)}); "
            "moe-train separates documents with one: add it as a special token"
        )

    def encode(self, text: str | bytes) -> np.ndarray:
        """str or UTF-8 bytes -> [n] int64 ids (no special tokens added)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Several texts at once (the library runs them in parallel)."""
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: np.ndarray | list[int], skip_eot: bool = False) -> str:
        arr = [int(i) for i in np.asarray(ids).reshape(-1)]
        if skip_eot:
            arr = [i for i in arr if i != self.eot_id]
        return self.tok.decode(arr, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """[V] UTF-8 bytes each token stands for; special tokens count 1 (like the byte
        tokenizer's end-of-document byte). Exact for byte-level BPE; for other tokenizers the
        token's text with SentencePiece's word marker as a space and <0xNN> as one byte."""
        special = {int(i) for i in self.tok.get_added_tokens_decoder()}
        byte_level = json.loads(self.tok.to_str()).get("decoder", {}) or {}
        decoder = _byte_decoder() if byte_level.get("type") == "ByteLevel" else None
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or i in special:
                out[i] = 1
            elif decoder is not None and all(c in decoder for c in piece):
                out[i] = len(piece)
            elif _BYTE_FALLBACK.fullmatch(piece):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.tok.save(str(Path(folder) / TOKENIZER_FILE))


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> HFTokenizer:
    """A byte-level BPE (GPT-2 style: byte alphabet, no unknown tokens) trained on `texts`, with
    `<|endoftext|>` as id 0. Offline: the `tokenizers` library, nothing downloaded."""
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(
            f"--vocab-size {vocab_size}: a byte-level BPE needs at least {MIN_BPE_VOCAB} "
            "(256 bytes + the end-of-document token)"
        )
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, f"byte-level BPE ({vocab_size})")


def load_tokenizer(folder: str | Path, name: str) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a sidecar names: `bytes`, or a tokenizer file in `folder`. A nanoGPT folder
    (name `unknown`) uses the folder's tokenizer.json when there is one."""
    if name == ByteTokenizer.name:
        return ByteTokenizer()
    path = Path(folder) / (TOKENIZER_FILE if name == "unknown" else name)
    if name == "unknown" and not path.is_file():
        raise DataError(
            f"{folder}: the token files do not say which tokenizer made them; put its "
            f"tokenizer.json (Hugging Face format) into {folder}"
        )
    return HFTokenizer.from_file(path)


def copy_tokenizer_files(data_dir: str | Path, name: str, out: str | Path) -> list[Path]:
    """Copy the tokenizer file a data folder names into `out` as tokenizer.json (for bytes: remove
    a stale one, e.g. of an earlier run in the same folder); the copies."""
    src = Path(data_dir) / (TOKENIZER_FILE if name == "unknown" else name)
    dst = Path(out) / TOKENIZER_FILE
    if name == ByteTokenizer.name:
        dst.unlink(missing_ok=True)
        return []
    if not src.is_file():
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    return [dst]

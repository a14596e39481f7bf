"""Byte-level tokenizer: token id = UTF-8 byte value (vocab 256). Id 0 (NUL) ends a document."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def get_tokenizer(name: str, folder: str | Path | None = None):
    """The tokenizer a token file's sidecar names: `bytes`, or a tokenizer file in `folder`
    (see moe_train.data.tokenizers.load_tokenizer)."""
    if name == ByteTokenizer.name:
        return ByteTokenizer()
    if folder is None:
        raise ValueError(f"tokenizer {name!r} is a file: give the data folder that holds it")
    from .tokenizers import load_tokenizer

    return load_tokenizer(folder, name)

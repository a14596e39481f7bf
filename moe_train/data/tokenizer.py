"""Byte-level tokenizer: token id = UTF-8 byte value (vocab 256). Id 0 (NUL) ends a document."""

from __future__ import annotations

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


def get_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer a token file's sidecar names. Only `bytes` exists for now."""
    if name != ByteTokenizer.name:
        raise ValueError(f"unknown tokenizer {name!r}; allowed: {ByteTokenizer.name}")
    return ByteTokenizer()

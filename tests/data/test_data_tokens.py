"""Token files: round trip, atomic writes, and a named DataError for every corrupt file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_train.data import DataError, TokenFile, TokenWriter, write_tokens


def test_round_trip_uint16(tmp_path: Path) -> None:
    arr = np.arange(1000) % 256
    path = write_tokens(tmp_path / "train.bin", arr, vocab_size=256, tokenizer="bytes")
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta == {
        "version": 1,
        "vocab_size": 256,
        "dtype": "uint16",
        "tokenizer": "bytes",
        "num_tokens": 1000,
        "max_token": 255,
    }
    tf = TokenFile(path)
    assert len(tf) == 1000 and tf.vocab_size == 256 and tf.tokenizer == "bytes"
    np.testing.assert_array_equal(tf.tokens, arr)
    assert path.stat().st_size == 2000


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    arr = np.array([0, 65535, 65536, 69999])
    tf = TokenFile(write_tokens(tmp_path / "t.bin", arr, vocab_size=70000, tokenizer="x"))
    assert tf.dtype.name == "uint32"
    np.testing.assert_array_equal(tf.tokens, arr)


def test_writer_is_atomic_on_error(tmp_path: Path) -> None:
    write_tokens(tmp_path / "t.bin", np.arange(10), 256, "bytes")
    with pytest.raises(RuntimeError), TokenWriter(tmp_path / "t.bin", 256, "bytes") as w:
        w.write(np.arange(5))
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin", "t.json"]  # no temporaries
    assert len(TokenFile(tmp_path / "t.bin")) == 10  # the previous file is intact


def test_writer_rejects_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token ids"):
        write_tokens(tmp_path / "t.bin", np.array([1, 256]), 256, "bytes")


def _good(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "train.bin", np.arange(300) % 256, 256, "bytes")


def _set_meta(path: Path, **changes: object) -> None:
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta.update(changes)
    side.write_text(json.dumps(meta))


def _missing_file(p: Path) -> None:
    p.unlink()


def _missing_sidecar(p: Path) -> None:
    p.with_suffix(".json").unlink()


def _invalid_sidecar(p: Path) -> None:
    p.with_suffix(".json").write_text("{not json")


def _sidecar_missing_field(p: Path) -> None:
    p.with_suffix(".json").write_text(json.dumps({"vocab_size": 256, "dtype": "uint16"}))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _short(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-20])


def _wrong_dtype_name(p: Path) -> None:
    _set_meta(p, dtype="float32")


def _uint32_read_as_uint16(p: Path) -> None:
    (np.arange(300, dtype=np.uint32) % 256).tofile(p)


def _vocab_too_big_for_dtype(p: Path) -> None:
    _set_meta(p, vocab_size=70000)


def _out_of_vocab(p: Path) -> None:
    arr = np.arange(300, dtype=np.uint16) % 256
    arr[257] = 1000
    arr.tofile(p)


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (_missing_file, "not found"),
        (_missing_sidecar, "missing"),
        (_invalid_sidecar, "not valid JSON"),
        (_sidecar_missing_field, "num_tokens"),
        (_empty, "empty"),
        (_truncated, "truncated"),
        (_short, "truncated"),
        (_wrong_dtype_name, "dtype"),
        (_uint32_read_as_uint16, "wrong dtype"),
        (_vocab_too_big_for_dtype, "wrong dtype"),
        (_out_of_vocab, "outside the vocabulary"),
    ],
)
def test_corrupt_file_names_the_file(tmp_path: Path, corrupt, words: str) -> None:
    path = _good(tmp_path)
    corrupt(path)
    with pytest.raises(DataError) as info:
        TokenFile(path)
    msg = str(info.value)
    assert str(path) in msg
    assert words in msg
    assert "moe-train-prepare" in msg
    assert isinstance(info.value, ValueError)

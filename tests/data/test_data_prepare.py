"""moe-train-prepare: round trips, inputs (file, folder, glob), deterministic split, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from moe_train.data import ByteTokenizer, DataError, prepare_corpus
from moe_train.data.prepare import main, split_documents
from tests.helpers.data import folder_bytes, split_tokens

TOK = ByteTokenizer()
TEXT = "Hello, wörld! ∑ MoE 🚀\nline two\n\ttabbed\n" * 50


def _docs(out: Path, split: str) -> list[str]:
    """Decoded documents of a split (each ends with the separator 0)."""
    ids = split_tokens(out, split)
    assert ids[-1] == TOK.eot_id
    return [TOK.decode(d, skip_eot=True) for d in np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]]


def _corpus(root: Path, n: int = 12) -> dict[str, str]:
    files = {f"sub{i % 3}/doc{i}.txt": f"document {i}\n" + "x" * (i * 37) for i in range(n)}
    files["sub0/skip.md"] = "markdown, not .txt"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return files


def _splits(out: Path) -> tuple[set[str], set[str]]:
    return set(_docs(out, "train")), set(_docs(out, "val"))


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_single_file_round_trip(tmp_path: Path, chunk_bytes: int) -> None:
    src = tmp_path / "book.txt"
    src.write_text(TEXT)
    r = prepare_corpus(
        [str(src)], tmp_path / "out", val_fraction=0.1, chunk_bytes=chunk_bytes, progress=False
    )
    train, val = split_tokens(tmp_path / "out", "train"), split_tokens(tmp_path / "out", "val")
    assert train[-1] == val[-1] == TOK.eot_id
    assert TOK.decode(np.concatenate([train[:-1], val[:-1]])) == TEXT
    n = len(TEXT.encode())
    assert len(val) - 1 == round(n * 0.1)  # the tail is val
    assert (r.train_tokens, r.val_tokens) == (len(train), len(val))


def test_folder_round_trip(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    r = prepare_corpus([str(tmp_path / "corpus")], tmp_path / "out", progress=False)
    train, val = _splits(tmp_path / "out")
    assert train and val and not train & val
    assert train | val == set(files.values())
    assert r.train_docs + r.val_docs == len(files)


def test_output_inside_input_is_ignored(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    for _ in range(2):  # the second run must not read the first run's output
        prepare_corpus([str(tmp_path / "corpus")], tmp_path / "corpus" / "tok", progress=False)
    assert set.union(*_splits(tmp_path / "corpus" / "tok")) == set(files.values())


def test_glob_and_ext(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "corpus")
    txt = {v for k, v in files.items() if k.endswith(".txt")}
    prepare_corpus([str(tmp_path / "corpus" / "**" / "*.txt")], tmp_path / "a", progress=False)
    assert set.union(*_splits(tmp_path / "a")) == txt
    prepare_corpus([str(tmp_path / "corpus")], tmp_path / "b", extensions=[".txt"], progress=False)
    assert _splits(tmp_path / "a") == _splits(tmp_path / "b")  # same keys, same split


def test_split_is_deterministic_and_stable(tmp_path: Path) -> None:
    _corpus(tmp_path / "c1", n=40)
    prepare_corpus([str(tmp_path / "c1")], tmp_path / "o1", progress=False)
    shutil.copytree(tmp_path / "c1", tmp_path / "elsewhere" / "c2")
    prepare_corpus([str(tmp_path / "elsewhere" / "c2")], tmp_path / "o2", progress=False)
    one, two = folder_bytes(tmp_path / "o1"), folder_bytes(tmp_path / "o2")
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one if k.endswith(".bin"))
    # adding documents never moves existing ones between splits
    keys = [f"d{i}.txt" for i in range(200)]
    before = dict(zip(keys[:100], split_documents(keys[:100], 0.1)))
    after = dict(zip(keys, split_documents(keys, 0.1)))
    assert all(after[k] == v for k, v in before.items())
    assert 0 < sum(after.values()) < 200


def test_two_documents_give_non_empty_splits(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(f"text of {name}")
    r = prepare_corpus([str(tmp_path / "in")], tmp_path / "out", val_fraction=0.001, progress=False)
    assert (r.train_docs, r.val_docs) == (1, 1)
    assert split_documents(["a", "b"], 0.999).count(False) == 1


def test_binary_skipped_and_nul_dropped(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    (tmp_path / "in" / "t.txt").write_bytes(b"a" * 9000 + b"\x00b")
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    r = prepare_corpus([str(tmp_path / "in")], tmp_path / "out", progress=False)
    assert [p.name for p in r.skipped] == ["blob.bin"]
    # the one text document is split by position: train head + val tail
    assert "".join(_docs(tmp_path / "out", "train") + _docs(tmp_path / "out", "val")) == (
        "a" * 9000 + "b"
    )


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare_corpus([str(tmp_path / "nope.txt")], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="matches no files"):
        prepare_corpus([str(tmp_path / "*.nope")], tmp_path / "out", progress=False)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--val-fraction" in capsys.readouterr().out
    _corpus(tmp_path / "corpus")
    assert main([str(tmp_path / "corpus"), "--out", str(tmp_path / "out"), "--ext", "txt"]) == 0
    assert "1 shard, train " in capsys.readouterr().out
    assert split_tokens(tmp_path / "out", "val").size > 0
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "corpus"), "--out", str(tmp_path / "o3"), "--val-fraction", "1.5"])

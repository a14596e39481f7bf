"""moe-train-prepare's inputs: every format round trips (mixed in one folder, a glob, nested
fields), and every kind of bad input gets an error naming the file (and line) and the fix."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from moe_train.data import ByteTokenizer, DataError, prepare_corpus
from moe_train.data.prepare import main
from tests.helpers.corpora import mixed_corpus, records, write_dataset, write_jsonl, write_parquet
from tests.helpers.data import manifest, split_tokens

TOK = ByteTokenizer()


def documents(out: Path) -> list[str]:
    """Every document of both splits, decoded (each ends with the separator 0)."""
    docs = []
    for split in ("train", "val"):
        ids = split_tokens(out, split)
        if ids.size:
            assert ids[-1] == TOK.eot_id
            docs += [
                TOK.decode(d, skip_eot=True)
                for d in np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]
            ]
    return docs


def test_every_format_in_one_folder_round_trips(tmp_path):
    expected = mixed_corpus(tmp_path / "corpus")
    r = prepare_corpus([str(tmp_path / "corpus")], tmp_path / "out", progress=False)
    want = [t for texts in expected.values() for t in texts]
    assert sorted(documents(tmp_path / "out")) == sorted(want)
    assert r.train_docs + r.val_docs == len(want) == r.stats.records
    assert r.train_docs and r.val_docs  # 158 records at 5%: both splits hold some


def test_a_datasets_dict_folder_reads_every_split(tmp_path):
    rows = records(10, "dd")
    write_dataset(tmp_path / "dd", rows, splits=True)
    prepare_corpus([str(tmp_path / "dd")], tmp_path / "out", progress=False)
    assert sorted(documents(tmp_path / "out")) == sorted(r["text"] for r in rows)


def test_globs_and_dotted_text_fields(tmp_path):
    rows = records(15, "n")
    write_jsonl(tmp_path / "in" / "x.jsonl", rows)
    write_parquet(tmp_path / "in" / "y.parquet", rows, row_group_size=4)
    (tmp_path / "in" / "skip.txt").write_text("not matched by the glob")
    prepare_corpus([str(tmp_path / "in" / "[xy].*")], tmp_path / "a", progress=False,
                   text_field="meta.body")  # fmt: skip
    bodies = [r["meta"]["body"] for r in rows]
    assert sorted(documents(tmp_path / "a")) == sorted(bodies * 2)  # both files, not skip.txt


def test_the_split_hashes_file_and_record_index_and_is_stable(tmp_path):
    rows = records(200, "s")
    write_jsonl(tmp_path / "c1" / "part-0.jsonl", rows)
    r1 = prepare_corpus([str(tmp_path / "c1")], tmp_path / "o1", val_fraction=0.2, progress=False)
    # a second file added: every record of the first stays where it was
    write_jsonl(tmp_path / "c1" / "part-1.jsonl", records(200, "t"))
    prepare_corpus([str(tmp_path / "c1")], tmp_path / "o2", val_fraction=0.2, progress=False)
    val1 = set(TOK.decode(split_tokens(tmp_path / "o1", "val")).split("\0"))
    val2 = set(TOK.decode(split_tokens(tmp_path / "o2", "val")).split("\0"))
    assert val1 <= val2 and len(val2) > len(val1)
    assert 20 < r1.val_docs < 60  # about 20% of 200


def test_empty_records_are_skipped_and_counted(tmp_path):
    rows = [{"text": "kept"}, {"text": ""}, {"text": "  \n"}, {"text": "also kept"}]
    write_jsonl(tmp_path / "e.jsonl", rows)
    (tmp_path / "empty.txt").write_text("")
    r = prepare_corpus([str(tmp_path)], tmp_path / "out", progress=False)
    assert sorted(documents(tmp_path / "out")) == ["also kept", "kept"]
    assert r.stats.empty == 3  # two empty records + one empty file
    assert manifest(tmp_path / "out")["stats"]["empty"] == 3


def test_a_line_that_is_not_json_is_named_or_skipped(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON.*--skip-bad"):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*-0000*"))  # nothing half-written stays
    r = prepare_corpus([str(path)], tmp_path / "out", progress=False, skip_bad=True)
    assert r.stats.bad_json == 1 and sorted(documents(tmp_path / "out")) == ["one", "three"]
    assert main([str(path), "--out", str(tmp_path / "cli"), "--skip-bad"]) == 0
    assert "1 lines that are not JSON" in capsys.readouterr().out


@pytest.mark.parametrize(
    "row, words",
    [
        ({"body": "x"}, "has no field 'text' (its fields: body)"),
        ({"text": 3}, "its field 'text' is int, not a string"),
        ({"text": None}, "is null, not a string"),
    ],
)
def test_a_record_without_a_string_text_is_named_or_skipped(tmp_path, row, words):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError, match=rf"r.jsonl:2: .*{re.escape(words)}.*--text-field"):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)
    r = prepare_corpus([str(path)], tmp_path / "out", progress=False, skip_bad=True)
    assert r.stats.bad_text == 1 and documents(tmp_path / "out") == ["fine"]


def test_a_nested_field_that_is_missing_names_the_level(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"meta": {"other": 1}}])
    with pytest.raises(DataError, match="meta has no field 'body' \\(its fields: other\\)"):
        prepare_corpus([str(path)], tmp_path / "o", progress=False, text_field="meta.body")


def test_parquet_without_the_column_names_the_columns(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"content": "x", "id": 1}], row_group_size=1)
    with pytest.raises(
        DataError, match=r"p.parquet: .*no column 'text' \(its columns: content, id\)"
    ):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)
    prepare_corpus([str(path)], tmp_path / "out", progress=False, text_field="content")
    assert documents(tmp_path / "out") == ["x"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_a_truncated_compressed_file_is_named(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"t{suffix}", records(3000, "t"),
                       "gzip" if suffix.endswith("gz") else "zstd")  # fmt: skip
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"t{suffix}: the (gzip|zstd) stream ends.*truncated"):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix in (".bin", ".idx", ".tmp")]


def test_a_malformed_json_array_is_named(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}]')
    with pytest.raises(DataError, match=r"a.json:4: expected ',' or ']' after element 1"):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(DataError, match=r"a.json:1: element 1 of the JSON array is not valid"):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)


def test_a_large_json_array_streams_in_pieces(tmp_path, monkeypatch):
    from moe_train.data import readers

    monkeypatch.setattr(readers, "_READ", 64)  # every element crosses a read boundary
    rows = records(50, "big")
    (tmp_path / "big.json").write_text(json.dumps(rows))
    prepare_corpus([str(tmp_path / "big.json")], tmp_path / "out", progress=False)
    assert sorted(documents(tmp_path / "out")) == sorted(r["text"] for r in rows)


def test_a_gzip_that_is_not_gzip_is_named(tmp_path):
    (tmp_path / "x.jsonl.gz").write_bytes(b"plain, not gzip\n")
    with pytest.raises(DataError, match="x.jsonl.gz: not a valid gzip file"):
        prepare_corpus([str(tmp_path / "x.jsonl.gz")], tmp_path / "out", progress=False)
    (tmp_path / "y.txt.gz").write_bytes(gzip.compress(b"compressed plain text\n"))
    prepare_corpus([str(tmp_path / "y.txt.gz")], tmp_path / "o2", progress=False)
    assert documents(tmp_path / "o2") == ["compressed plain text\n"]


def test_a_missing_optional_library_says_how_to_install_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "p.parquet", [{"text": "x"}], row_group_size=1)
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # import fails
    with pytest.raises(DataError, match=r'needs `pyarrow`: pip install "moe-train\[data\]"'):
        prepare_corpus([str(path)], tmp_path / "out", progress=False)


def test_zstd_files_of_several_frames_read_whole(tmp_path):
    import zstandard

    a, b = records(20, "f1"), records(20, "f2")
    frames = b"".join(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode())
        for rows in (a, b)
    )  # what `cat a.zst b.zst` makes
    (tmp_path / "two.jsonl.zst").write_bytes(frames)
    prepare_corpus([str(tmp_path / "two.jsonl.zst")], tmp_path / "out", progress=False)
    assert sorted(documents(tmp_path / "out")) == sorted(r["text"] for r in a + b)

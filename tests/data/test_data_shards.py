"""Sharded output: a manifest with counts and checksums, the same bytes for 1 and N workers, a
resumed run equal to an uninterrupted one, nothing half-written after a failure, and a missing
or damaged shard named when the folder is opened."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_train.data import DataError, IndexedTokens, open_source, pipeline, prepare_corpus
from tests.helpers.corpora import records, write_jsonl, write_parquet
from tests.helpers.data import folder_bytes, manifest, split_tokens

SHARD = 3000  # input bytes per shard: the corpus below makes several


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for k in range(4):
        write_jsonl(root / f"part-{k}.jsonl", records(40, f"p{k}"))
    write_jsonl(root / "zz.jsonl.zst", records(30, "z"), "zstd")
    write_parquet(root / "table.parquet", records(60, "pq"), row_group_size=15)
    return root


def prepare(corpus: Path, out: Path, **kw):
    return prepare_corpus([str(corpus)], out, progress=False, shard_bytes=SHARD, **kw)


def test_the_manifest_lists_every_shard_with_counts_and_checksums(corpus, tmp_path):
    r = prepare(corpus, tmp_path / "out")
    meta = manifest(tmp_path / "out")
    assert r.shards == len(meta["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        assert [s["name"] for s in shards] == [f"{split}-{k:05d}" for k in range(r.shards)]
        for s in shards:
            t = IndexedTokens(tmp_path / "out" / s["name"])
            assert (t.num_tokens, t.num_documents) == (s["tokens"], s["documents"])
            assert (tmp_path / "out" / f"{s['name']}.bin").stat().st_size == s["bin"]["bytes"]
        assert meta["splits"][split]["tokens"] == sum(s["tokens"] for s in shards)
    assert (
        meta["splits"]["train"]["tokens"]
        == r.train_tokens
        == len(split_tokens(tmp_path / "out", "train"))
    )
    assert meta["stats"]["records"] == 4 * 40 + 30 + 60
    assert not (tmp_path / "out" / pipeline.WORK_DIR).exists()


def test_two_workers_write_the_same_bytes_as_one(corpus, tmp_path):
    prepare(corpus, tmp_path / "one", workers=1)
    prepare(corpus, tmp_path / "two", workers=2)
    one, two = folder_bytes(tmp_path / "one"), folder_bytes(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 8
    assert [k for k in one if one[k] != two[k]] == []


def test_a_rerun_after_a_crash_resumes_and_ends_with_the_same_files(corpus, tmp_path, monkeypatch):
    prepare(corpus, tmp_path / "full")
    real = pipeline.build_shard
    built: list[int] = []

    def crash_at_shard_3(job):
        if job.index == 3:
            raise KeyboardInterrupt  # killed half-way through shard 3
        built.append(job.index)
        return real(job)

    monkeypatch.setattr(pipeline, "build_shard", crash_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "resumed")
    out = tmp_path / "resumed"
    assert built == [0, 1, 2] and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[012].*")}
    monkeypatch.setattr(
        pipeline, "build_shard", lambda job: (built.append(job.index), real(job))[1]
    )
    r = prepare(corpus, out)
    assert r.resumed == 3 and built[3:] == list(range(3, r.shards))  # only the unfinished ones
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-0000[012].*")} == kept
    assert folder_bytes(out) == folder_bytes(tmp_path / "full")


def test_a_failing_shard_leaves_no_file_a_later_run_would_read(corpus, tmp_path):
    (corpus / "part-2.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="part-2.jsonl:2"):
        prepare(corpus, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file())
    assert "manifest.json" not in names and not [n for n in names if n.endswith(".tmp")]
    with pytest.raises(DataError, match="unfinished moe-train-prepare output.*again"):
        open_source(tmp_path / "out")  # the finished shards are not read as Megatron files


def test_a_missing_or_damaged_shard_is_named(corpus, tmp_path):
    prepare(corpus, tmp_path / "out")
    out = tmp_path / "out"
    open_source(out)  # verifies
    data = bytearray((out / "train-00001.bin").read_bytes())
    data[5] ^= 0xFF  # same size, one byte flipped
    (out / "train-00001.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00001.bin: CRC-32 .* the file is damaged"):
        open_source(out)
    open_source(out, checksums=False)  # sizes only: data.verify_checksums=false
    (out / "val-00002.idx").unlink()
    with pytest.raises(DataError, match="val-00002.idx is listed in manifest.json but missing"):
        open_source(out, checksums=False)


def test_a_truncated_shard_and_a_bad_manifest_are_named(corpus, tmp_path):
    prepare(corpus, tmp_path / "out")
    out = tmp_path / "out"
    path = out / "train-00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="train-00000.bin: .* bytes, but manifest.json says"):
        open_source(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json is not valid JSON"):
        open_source(out)
    (out / "manifest.json").write_text(json.dumps({"format": "moe-train-shards", "version": 9}))
    with pytest.raises(DataError, match="format version 9"):
        open_source(out)


def test_preparing_again_replaces_a_different_corpus_and_old_flat_files(corpus, tmp_path):
    out = tmp_path / "out"
    from moe_train.data import write_tokens

    write_tokens(out / "train.bin", np.arange(100) % 256, 256, "bytes")  # an earlier version's
    write_tokens(out / "val.bin", np.arange(100) % 256, 256, "bytes")
    big = prepare(corpus, out)
    small = tmp_path / "small"
    write_jsonl(small / "one.jsonl", records(20, "s"))
    r = prepare(small, out)
    assert r.shards < big.shards
    names = {p.name for p in out.iterdir()}
    assert not {"train.bin", "val.bin", "train.json"} & names
    assert {f"train-{k:05d}.bin" for k in range(r.shards)} == {
        n for n in names if n.startswith("train-") and n.endswith(".bin")
    }
    assert open_source(out).kind == "shards"


def test_rerunning_a_finished_prepare_keeps_every_shard(corpus, tmp_path):
    prepare(corpus, tmp_path / "out")
    before = folder_bytes(tmp_path / "out")
    r = prepare(corpus, tmp_path / "out")
    assert folder_bytes(tmp_path / "out") == before and r.resumed == 0  # rebuilt, same bytes


def test_a_bpe_interrupted_run_reuses_its_tokenizer(corpus, tmp_path, monkeypatch):
    prepare(corpus, tmp_path / "full", tokenizer="bpe", vocab_size=300)
    real = pipeline.build_shard

    def crash(job):
        if job.index == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(pipeline, "build_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "re", tokenizer="bpe", vocab_size=300)
    monkeypatch.setattr(pipeline, "build_shard", real)
    import moe_train.data.flat as flat

    monkeypatch.setattr(flat, "train_bpe", lambda *a, **k: pytest.fail("the BPE was retrained"))
    r = prepare(corpus, tmp_path / "re", tokenizer="bpe", vocab_size=300)
    assert r.resumed == 2 and folder_bytes(tmp_path / "re") == folder_bytes(tmp_path / "full")

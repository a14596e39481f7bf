"""Megatron-LM indexed datasets: files from Megatron-Core's own writer read in place (tokens and
document boundaries), moe-train's shards read by Megatron-Core's reader, the layout as
documented (without Megatron installed), corrupt and mismatched indexes named, and a Megatron
prefix or folder as a training source (held-out tail, vocabulary)."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_train.data import DataError, IndexedTokens, IndexedWriter, open_source, prepare_corpus
from moe_train.data.megatron import MAGIC, index_bytes
from tests.helpers.corpora import records, write_jsonl

DOCS = [np.arange(n, dtype=np.int64) % 250 + 1 for n in (5, 1, 12, 7, 30, 3)]


def megatron_dataset():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def write_with_megatron(prefix: Path, docs, dtype=np.uint16, split_last: bool = False) -> None:
    """Megatron-Core's IndexedDatasetBuilder, as tools/preprocess_data.py drives it."""
    md = megatron_dataset()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    b = md.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, d in enumerate(docs):
        if split_last and i == len(docs) - 1:  # one document of two sequences (sentences)
            b.add_document(d, [len(d) // 2, len(d) - len(d) // 2])
        else:
            b.add_item(torch.from_numpy(d))
            b.end_document()
    b.finalize(f"{prefix}.idx")


def starts_of(docs) -> list[int]:
    return np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]]).tolist()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatrons_own_files_read_in_place(tmp_path, dtype):
    write_with_megatron(tmp_path / "ds", DOCS, dtype, split_last=True)
    t = IndexedTokens(tmp_path / "ds")
    assert t.dtype == np.dtype(dtype) and t.num_documents == len(DOCS)
    assert np.array_equal(np.asarray(t.tokens), np.concatenate(DOCS))
    assert isinstance(t.tokens, np.memmap)  # in place, nothing converted
    assert t.doc_starts_between(0, len(t)).tolist() == starts_of(DOCS)  # not the 2nd sentence
    assert t.doc_starts_between(6, 20).tolist() == [6, 18]


def test_megatron_reads_moe_train_shards(tmp_path):
    md = megatron_dataset()
    write_jsonl(tmp_path / "in" / "a.jsonl", records(40, "m"))
    prepare_corpus([str(tmp_path / "in")], tmp_path / "out", progress=False)
    ours = IndexedTokens(tmp_path / "out" / "train-00000")
    theirs = md.IndexedDataset(str(tmp_path / "out" / "train-00000"))
    assert len(theirs) == ours.num_documents
    starts = ours.doc_starts_between(0, len(ours)).tolist() + [len(ours)]
    for d in range(len(theirs)):
        assert np.array_equal(theirs[d], np.asarray(ours.tokens[starts[d] : starts[d + 1]]))
        assert theirs[d][-1] == 0  # each document ends with the end-of-document token


def test_the_writer_follows_the_documented_layout(tmp_path):
    """Without Megatron: the header fields and arrays at the offsets megatron.py documents."""
    with IndexedWriter(tmp_path / "x", np.dtype("uint16")) as w:
        for d in DOCS:
            w.add(d[:2])
            w.add(d[2:])  # a document in two pieces is still one sequence
            w.end_document()
    raw = (tmp_path / "x.idx").read_bytes()
    assert raw[:9] == MAGIC and struct.unpack("<QB", raw[9:18]) == (1, 8)  # version, uint16
    s, d = struct.unpack("<QQ", raw[18:34])
    assert (s, d) == (len(DOCS), len(DOCS) + 1)
    lengths = np.frombuffer(raw, "<i4", s, 34)
    pointers = np.frombuffer(raw, "<i8", s, 34 + 4 * s)
    doc_index = np.frombuffer(raw, "<i8", d, 34 + 12 * s)
    assert lengths.tolist() == [len(x) for x in DOCS]
    assert pointers.tolist() == [2 * p for p in starts_of(DOCS)]
    assert doc_index.tolist() == list(range(len(DOCS) + 1))
    assert len(raw) == 34 + 12 * s + 8 * d
    assert (tmp_path / "x.bin").read_bytes() == np.concatenate(DOCS).astype("<u2").tobytes()
    assert w.crc32["idx"] == f"{__import__('zlib').crc32(raw):08x}"


def corrupt(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda idx, b: corrupt(idx, b"NOTMEGA" + idx.read_bytes()[7:]), "does not start with Megatron's header"),
        (lambda idx, b: corrupt(idx, idx.read_bytes()[:-5]), "truncated or corrupt"),
        (lambda idx, b: corrupt(b, b.read_bytes() + b"\0\0"), "do not belong together"),
        (lambda idx, b: corrupt(b, b.read_bytes()[:-2]), "do not belong together"),
        (lambda idx, b: corrupt(idx, idx.read_bytes()[:17] + b"\x07" + idx.read_bytes()[18:]), "float32 values, not token ids"),
        (lambda idx, b: corrupt(idx, idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:]), "format version 2"),
    ],
)  # fmt: skip
def test_a_corrupt_or_mismatched_index_is_named(tmp_path, damage, words):
    idx_bytes = index_bytes(np.dtype("uint16"), [len(d) for d in DOCS], list(range(len(DOCS) + 1)))
    (tmp_path / "ds.idx").write_bytes(idx_bytes)
    (tmp_path / "ds.bin").write_bytes(np.concatenate(DOCS).astype("<u2").tobytes())
    IndexedTokens(tmp_path / "ds")
    damage(tmp_path / "ds.idx", tmp_path / "ds.bin")
    with pytest.raises(DataError, match=words) as e:
        IndexedTokens(tmp_path / "ds")
    assert "ds.idx" in str(e.value)


def test_broken_document_indices_and_gaps_are_named(tmp_path):
    lengths = [len(d) for d in DOCS]
    data = np.concatenate(DOCS).astype("<u2").tobytes()
    (tmp_path / "ds.bin").write_bytes(data)
    (tmp_path / "ds.idx").write_bytes(index_bytes(np.dtype("uint16"), lengths, [0, 3, 2, 6]))
    with pytest.raises(DataError, match="document indices decrease"):
        IndexedTokens(tmp_path / "ds")
    (tmp_path / "ds.idx").write_bytes(index_bytes(np.dtype("uint16"), lengths, [0, 3, 5]))
    with pytest.raises(DataError, match="must run from 0 to the sequence count 6"):
        IndexedTokens(tmp_path / "ds")
    raw = bytearray(index_bytes(np.dtype("uint16"), lengths, list(range(7))))
    struct.pack_into("<q", raw, 34 + 4 * 6 + 8 * 2, 999)  # sequence 2 starts elsewhere
    (tmp_path / "ds.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sequence 2 starts at byte 999"):
        IndexedTokens(tmp_path / "ds")
    (tmp_path / "lonely.bin").write_bytes(data)
    with pytest.raises(DataError, match="lonely.idx too"):
        open_source(tmp_path / "lonely")


def test_a_megatron_prefix_trains_with_a_held_out_tail(tmp_path):
    docs = [np.full(20 + i, i % 200 + 1, dtype=np.int64) for i in range(100)]
    write_with_megatron(tmp_path / "corpus_text_document", docs)
    with pytest.raises(DataError, match="give model.vocab_size=N .* tokenizer.json"):
        open_source(tmp_path / "corpus_text_document")
    s = open_source(tmp_path / "corpus_text_document", vocab_size=256, holdout=0.1)
    assert s.kind == "megatron" and s.vocab_size == 256 and s.tokenizer_id is None
    total = sum(len(d) for d in docs)
    assert len(s.val) == sum(len(d) for d in docs[90:]) and len(s.train) + len(s.val) == total
    assert np.array_equal(s.val.read(0, len(docs[90])), docs[90])  # the 10 last documents
    assert s.largest_ids() == [(str(tmp_path / "corpus_text_document.bin"), 100)]
    assert open_source(tmp_path / "corpus_text_document", 256, holdout=0.0).val is None


def test_a_folder_of_megatron_files_and_a_tokenizer_beside_them(tmp_path):
    from moe_train.data.tokenizers import train_bpe

    write_with_megatron(tmp_path / "m" / "a_text_document", DOCS[:3])
    write_with_megatron(tmp_path / "m" / "b_text_document", DOCS[3:])
    tok = train_bpe(["some text for a tokenizer"] * 10, 300)
    tok.save(tmp_path / "m")
    s = open_source(tmp_path / "m", holdout=0.0)  # the vocabulary comes from tokenizer.json
    assert s.tokenizer == "tokenizer.json" and s.vocab_size == tok.vocab_size and s.tokenizer_id
    assert np.array_equal(s.train.read(0, len(s.train)), np.concatenate(DOCS))
    assert s.train.document_starts(0, len(s.train)).tolist() == starts_of(DOCS)

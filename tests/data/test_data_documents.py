"""Document boundaries inside a window, from the document index (shards, Megatron files) or the
end-of-document tokens (flat files), across shard boundaries: what document masks are built from."""

from __future__ import annotations

import numpy as np
import pytest

from moe_train.data import (
    BatchSampler,
    IndexedWriter,
    TokenStream,
    document_ids,
    document_lengths,
    open_source,
    prepare_corpus,
)
from moe_train.data.documents import positions
from moe_train.data.megatron import IndexedTokens
from moe_train.data.streams import Segment
from tests.helpers.corpora import write_jsonl

LENGTHS = [5, 3, 9, 1, 6, 12, 4]


def doc_starts() -> list[int]:
    return np.concatenate([[0], np.cumsum(LENGTHS)[:-1]]).tolist()


def brute_force(all_starts: list[int], start: int, n: int) -> list[int]:
    return sorted({0} | {s - start for s in all_starts if start < s < start + n})


def indexed(tmp_path, lengths, name="ds") -> IndexedTokens:
    with IndexedWriter(tmp_path / name, np.dtype("uint16")) as w:
        for i, n in enumerate(lengths):
            w.add(np.full(n, i + 1))
            w.end_document()
    return IndexedTokens(tmp_path / name)


def test_window_boundaries_from_the_index_match_brute_force(tmp_path):
    t = indexed(tmp_path, LENGTHS)
    stream = TokenStream([Segment(t.tokens, "ds", t)], "ds")
    total = sum(LENGTHS)
    for start in range(total - 4):
        for n in {1, 4, 7, total - start} & set(range(1, total - start + 1)):
            assert stream.document_starts(start, n).tolist() == brute_force(doc_starts(), start, n)


def test_boundaries_across_segments_and_from_end_of_document_tokens(tmp_path):
    a, b = indexed(tmp_path, LENGTHS[:3], "a"), indexed(tmp_path, LENGTHS[3:], "b")
    stream = TokenStream([Segment(a.tokens, "a", a), Segment(b.tokens, "b", b)], "ab")
    assert stream.document_starts(0, sum(LENGTHS)).tolist() == doc_starts()  # b starts a document
    assert stream.document_starts(15, 6).tolist() == [0, 2, 3]  # across the segment boundary
    ids = np.array([7, 7, 0, 8, 0, 9, 9, 9, 0, 5])  # flat files: 0 ends a document
    flat = TokenStream([Segment(ids, "flat", eot_id=0)], "flat")
    assert flat.document_starts(0, 10).tolist() == [0, 3, 5, 9]
    assert flat.document_starts(3, 5).tolist() == [0, 2]
    assert TokenStream([Segment(ids, "unknown")], "u").document_starts(0, 10).tolist() == [0]


def test_ids_lengths_and_positions_of_a_window():
    starts = np.array([0, 3, 5])
    assert document_ids(starts, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert document_lengths(starts, 8).tolist() == [3, 2, 3]
    assert positions(starts, 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("sampling", ["windows", "epoch"])
def test_a_prepared_folder_gives_each_rows_documents(tmp_path, sampling):
    rows = [{"text": "x" * n} for n in (40, 3, 17, 60, 8, 25, 33, 2, 70, 11)]
    write_jsonl(tmp_path / "in" / "d.jsonl", rows)
    prepare_corpus([str(tmp_path / "in")], tmp_path / "out", progress=False, val_fraction=0.01)
    train = open_source(tmp_path / "out").train
    all_ids = train.read(0, len(train))
    eots = (np.flatnonzero(all_ids == 0) + 1).tolist()
    s = BatchSampler([train], [1.0], 3, 4, 16, sampling)
    for step in range(5):
        _, starts = s.rows(step)
        for row in range(4):
            want = brute_force([0, *eots], int(starts[row]), 16)
            assert s.document_starts(step, row).tolist() == want

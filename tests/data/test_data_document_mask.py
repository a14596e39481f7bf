"""data.document_mask: the batches carry each token's position inside its document, a pure
function of (seed, step), the same rows on 1 rank as on the concatenation of N ranks' slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_train.data import DataConfig, DataError, open_data, prepare_corpus
from moe_train.training.batches import BatchPlan
from tests.helpers.corpora import write_jsonl

EOT = 0  # the byte tokenizer's end-of-document token
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    lengths = [40, 3, 17, 60, 8, 25, 33, 2, 70, 11, 5, 48, 19, 9, 30] * 4
    write_jsonl(root / "in" / "d.jsonl", [{"text": "ab" * (n // 2) + "c"} for n in lengths])
    prepare_corpus([str(root / "in")], root / "out", progress=False, val_fraction=0.2)
    return root / "out"


def expected_positions(x: torch.Tensor) -> torch.Tensor:
    """Positions restarting after every end-of-document token (and at each row's start)."""
    out = torch.empty_like(x)
    for r, row in enumerate(x.tolist()):
        p = 0
        for t in range(len(row)):
            out[r, t] = p = 0 if t == 0 or row[t - 1] == EOT else p + 1
    return out


def positions_of(mb) -> torch.Tensor:
    """A micro-batch's positions; None stands for one document per row."""
    if mb.positions is None:
        assert torch.equal(expected_positions(mb.x), torch.arange(16).expand_as(mb.x))
        return torch.arange(16).expand_as(mb.x)
    return mb.positions


def plan(rank: int, world: int, micro: int, accum: int, masked: bool = True) -> BatchPlan:
    return BatchPlan(7, 8, 16, micro, accum, rank, world, CPU, document_mask=masked)


def test_positions_restart_at_documents_and_split_over_ranks_like_the_tokens(prepared):
    data = open_data(DataConfig(dir=str(prepared), document_mask=True))
    assert data.document_mask and "document mask" in data.describe(8, 16)
    for step in range(3):
        (one,) = plan(0, 1, 8, 1).micro_batches(data, step)
        assert one.positions is not None and one.positions.dtype == torch.int64
        assert torch.equal(one.positions, expected_positions(one.x))
        assert (one.positions == 0).sum() > 8  # some rows hold more than one document
        parts = [mb for rank in (0, 1) for mb in plan(rank, 2, 2, 2).micro_batches(data, step)]
        assert torch.equal(torch.cat([mb.x for mb in parts]), one.x)
        assert torch.equal(torch.cat([positions_of(mb) for mb in parts]), one.positions)
    assert all(mb.positions is None for mb in plan(0, 1, 8, 1, False).micro_batches(data, 0))


def test_a_micro_batch_of_whole_windows_takes_the_unmasked_attention(tmp_path):
    write_jsonl(tmp_path / "in" / "d.jsonl", [{"text": c * 80} for c in "abcdef"])
    prepare_corpus([str(tmp_path / "in")], tmp_path / "out", progress=False, val_fraction=0.01)
    data = open_data(DataConfig(dir=str(tmp_path / "out"), document_mask=True))
    seen = {
        mb.positions is None for s in range(8) for mb in plan(0, 1, 1, 8).micro_batches(data, s)
    }
    assert seen == {True, False}  # a row across the boundary keeps its positions, others not


def test_validation_batches_carry_their_positions_too(prepared):
    val = open_data(DataConfig(dir=str(prepared), document_mask=True)).first.val
    ((x, _, positions),) = plan(1, 2, 2, 2).eval_batches(val, 1)
    assert x.shape == (4, 16) and torch.equal(positions, expected_positions(x))
    assert (positions == 0).sum() > 4
    assert all(p is None for _, _, p in plan(1, 2, 2, 2, False).eval_batches(val, 1))


def test_a_folder_without_document_boundaries_names_the_fix(tmp_path):
    ids = np.arange(5000, dtype=np.uint16) % 300  # nanoGPT's raw files: no sidecar, no index
    for split in ("train", "val"):
        ids.tofile(tmp_path / f"{split}.bin")
    open_data(DataConfig(dir=str(tmp_path)), vocab_size=300)  # unmasked: fine
    with pytest.raises(DataError, match="document_mask.*re-run moe-train-prepare"):
        open_data(DataConfig(dir=str(tmp_path), document_mask=True), vocab_size=300)

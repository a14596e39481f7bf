"""Sampling is a pure function of (seed, step); rank shares tile the global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moe_train.data import (
    DataError,
    TokenFile,
    get_batch,
    num_val_batches,
    rank_share,
    sample_offsets,
    val_batches,
    write_tokens,
)

SEQ = 16


@pytest.fixture
def tokens(tmp_path: Path) -> TokenFile:
    rng = np.random.default_rng(0)
    return TokenFile(write_tokens(tmp_path / "train.bin", rng.integers(0, 256, 5000), 256, "bytes"))


def test_offsets_are_pure_and_in_range() -> None:
    a = sample_offsets(seed=3, step=7, global_batch=64, num_tokens=1000, seq_len=SEQ)
    b = sample_offsets(seed=3, step=7, global_batch=64, num_tokens=1000, seq_len=SEQ)
    assert a.dtype == np.int64 and a.shape == (64,)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1000 - SEQ - 1
    assert not np.array_equal(a, sample_offsets(3, 8, 64, 1000, SEQ))
    assert not np.array_equal(a, sample_offsets(4, 7, 64, 1000, SEQ))
    # exhaustive on a tiny file: every start including the last valid one can appear
    assert set(sample_offsets(0, 0, 2000, SEQ + 3, SEQ).tolist()) == {0, 1, 2}


def test_batch_is_shifted_window(tokens: TokenFile) -> None:
    x, y = get_batch(tokens, seed=1, step=5, global_batch=8, seq_len=SEQ)
    assert x.shape == y.shape == (8, SEQ) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    data = torch.from_numpy(np.asarray(tokens.tokens, dtype=np.int64))
    for row, o in zip(range(8), sample_offsets(1, 5, 8, len(tokens), SEQ)):
        assert torch.equal(x[row], data[o : o + SEQ])
        assert torch.equal(y[row], data[o + 1 : o + SEQ + 1])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_rank_shares_concatenate_to_global_batch(tokens: TokenFile, world: int) -> None:
    gb = 12
    full_x, full_y = get_batch(tokens, 0, 11, gb, SEQ)
    shares = [rank_share(gb, r, world) for r in range(world)]
    parts = [get_batch(tokens, 0, 11, gb, SEQ, s, c) for s, c in shares]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    assert sum(c for _, c in shares) == gb


def test_too_short_file_is_named(tmp_path: Path) -> None:
    tf = TokenFile(write_tokens(tmp_path / "tiny.bin", np.arange(10), 256, "bytes"))
    with pytest.raises(DataError) as info:
        get_batch(tf, 0, 0, 2, seq_len=10)
    assert str(tf.path) in str(info.value) and "10 tokens" in str(info.value)
    assert "11" in str(info.value)
    get_batch(tf, 0, 0, 2, seq_len=9)  # exactly seq_len + 1 tokens is enough


def test_bad_slice_and_args(tokens: TokenFile) -> None:
    with pytest.raises(ValueError, match="outside"):
        get_batch(tokens, 0, 0, 4, SEQ, sample_start=3, sample_count=2)
    with pytest.raises(ValueError, match="non-negative"):
        sample_offsets(-1, 0, 4, 100, SEQ)


def test_val_batches_deterministic_and_sharded(tokens: TokenFile) -> None:
    bs = 6
    n = num_val_batches(tokens, SEQ, bs)
    assert n == (len(tokens) - 1) // SEQ // bs
    full = list(val_batches(tokens, SEQ, bs))
    assert len(full) == n
    xs = torch.cat([x for x, _ in full])
    data = torch.from_numpy(np.asarray(tokens.tokens, dtype=np.int64))
    assert torch.equal(xs.reshape(-1), data[: n * bs * SEQ])  # sequential, non-overlapping
    assert torch.equal(torch.cat([y for _, y in full]).reshape(-1), data[1 : n * bs * SEQ + 1])
    assert [torch.equal(a[0], b[0]) for a, b in zip(full, val_batches(tokens, SEQ, bs))] == [
        True
    ] * n
    assert len(list(val_batches(tokens, SEQ, bs, max_batches=2))) == 2
    for world in (2, 4):
        per_rank = [
            list(val_batches(tokens, SEQ, bs, None, *rank_share(bs, r, world)))
            for r in range(world)
        ]
        for b in range(n):
            assert torch.equal(torch.cat([per_rank[r][b][0] for r in range(world)]), full[b][0])


def test_val_too_small_is_named(tmp_path: Path) -> None:
    tf = TokenFile(write_tokens(tmp_path / "val.bin", np.arange(40), 256, "bytes"))
    with pytest.raises(DataError) as info:
        num_val_batches(tf, SEQ, batch_size=4)
    assert str(tf.path) in str(info.value) and "40 tokens" in str(info.value)

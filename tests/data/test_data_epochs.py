"""Epoch sampling: a keyed bijection (Feistel, cycle-walked) visits every non-overlapping window
exactly once per epoch, in a different order each epoch, as a pure function of (seed, step) —
so a run resumed at an epoch boundary reads exactly the batches of an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest

from moe_train.data import BatchSampler, TokenStream
from moe_train.data.epochs import FeistelPermutation, epoch_windows


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 100, 1023, 4097])
def test_the_permutation_is_a_bijection_for_any_size(n):
    for key in (0, 1, 2**63 + 5):
        p = FeistelPermutation(n, key)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    assert n < 4 or not np.array_equal(FeistelPermutation(n, 1)(np.arange(n)), np.arange(n))


@pytest.mark.parametrize("n", [3, 100, 5000, 2**40 + 7])
def test_small_batches_take_the_same_permutation_in_python_ints(n):
    from moe_train.data.epochs import SMALL

    p = FeistelPermutation(n, 99)
    x = np.arange(min(n, 3 * SMALL)) * max(1, n // (3 * SMALL))
    assert np.array_equal(np.concatenate([p(x[i : i + 5]) for i in range(0, len(x), 5)]), p(x))


def test_a_huge_corpus_needs_no_index():
    n = 250_000_000  # 1T tokens / 4096
    p = FeistelPermutation(n, 3)
    sample = p(np.arange(0, n, n // 1000))
    assert sample.min() >= 0 and sample.max() < n and len(set(sample.tolist())) == len(sample)
    assert p.keys and not hasattr(p, "table")


def windows_of(sampler: BatchSampler, steps) -> list[int]:
    out = []
    for s in steps:
        _, starts = sampler.rows(s)
        out += (starts // sampler.seq_len).tolist()
    return out


@pytest.mark.parametrize("B, n_windows", [(4, 12), (5, 12), (3, 7), (1, 5)])
def test_every_window_once_per_epoch_in_a_new_order(B, n_windows):
    T = 8
    stream = TokenStream.of(np.arange(n_windows * T + 1 + 3))  # +3: a tail shorter than a window
    s = BatchSampler([stream], [1.0], seed=11, global_batch=B, seq_len=T, sampling="epoch")
    steps = 4 * n_windows  # four epochs' worth of samples (B per step)
    seen = windows_of(s, range(steps))
    epochs = [seen[e * n_windows : (e + 1) * n_windows] for e in range(4 * B)]
    for order in epochs:
        assert sorted(order) == list(range(n_windows))
    if n_windows > 3:
        assert len({tuple(e) for e in epochs}) > 1  # not the same order every epoch
    x, y = s.batch(0)
    assert (x[:, 0] % T == 0).all()  # non-overlapping windows: starts on multiples of T


def test_epoch_sampling_is_pure_so_resuming_at_an_epoch_boundary_is_exact():
    T, n_windows, B = 4, 10, 5  # an epoch is 2 steps
    stream = TokenStream.of(np.arange(n_windows * T + 1))
    full = BatchSampler([stream], [1.0], 2, B, T, "epoch")
    run = [full.batch(s)[0] for s in range(8)]
    resumed = BatchSampler([stream], [1.0], 2, B, T, "epoch")  # a fresh process, no state
    for s in (2, 4, 6):  # the epoch boundaries
        assert all((resumed.batch(t)[0] == run[t]).all() for t in range(s, 8))
    assert sorted(windows_of(full, [2, 3])) == list(range(n_windows))  # epoch 1, whole


def test_a_mixture_walks_each_sources_epochs_independently():
    T = 4
    a = TokenStream.of(np.arange(6 * T + 1))  # 6 windows
    b = TokenStream.of(np.arange(10 * T + 1) + 10_000)  # 10 windows
    s = BatchSampler([a, b], [1.0, 1.0], 0, 4, T, "epoch")  # 2 + 2 per step
    rows = [s.rows(step) for step in range(15)]
    for i, n in ((0, 6), (1, 10)):
        seen = [int(o) // T for src, off in rows for k, o in zip(src, off) if k == i]
        for e in range(len(seen) // n):
            assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))


def test_windows_are_keyed_by_seed_and_source():
    a = epoch_windows(0, 0, 0, 50, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_windows(1, 0, 0, 50, 50))
    assert not np.array_equal(a, epoch_windows(0, 1, 0, 50, 50))
    assert np.array_equal(epoch_windows(0, 0, 20, 10, 50), a[20:30])

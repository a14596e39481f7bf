"""Epoch sampling: every non-overlapping window once per epoch, in a fresh shuffled order each
epoch, as a pure function of (seed, source, sample number). No index of the corpus's size.

A source of n tokens has W = (n - 1) // T windows; window j is tokens [jT, jT + T + 1) (inputs and
shifted targets). The k-th window the source gives (counting from step 0) is window
perm_e(k mod W) of epoch e = k // W, where perm_e is a keyed bijection of [0, W): a balanced
Feistel network on the smallest even number of bits b with 2^b >= W (six rounds, SplitMix64
round function keyed by (seed, source, epoch, round)), cycle-walked (re-applied while the value
is >= W, under four times on average since 2^b < 4W). Costs O(1) memory and a few integer
operations per window, for 250M windows as for 25.
"""

from __future__ import annotations

import numpy as np

from ..ops.hashing import splitmix_int

ROUNDS = 6
SMALL = 64  # fewer indices than this: Python ints (numpy's per-call cost dominates tiny arrays)
_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A bijection of [0, n) keyed by `key` (an int): `perm(x)` for an int64 array x."""

    def __init__(self, n: int, key: int) -> None:
        if n <= 0:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        k = key & _M64
        self.int_keys = []
        for r in range(ROUNDS):
            k = splitmix_int(k ^ (r + 1))
            self.int_keys.append(k)
        self.keys = [np.uint64(k) for k in self.int_keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_splitmix(right ^ k) & self.mask)
        return (left << h) | right

    def _encrypt_int(self, x: int) -> int:
        """_encrypt of one value, with Python ints (the same bits)."""
        h, mask = self.half, (1 << self.half) - 1
        left, right = x >> h, x & mask
        for k in self.int_keys:
            left, right = right, left ^ (splitmix_int(right ^ k) & mask)
        return (left << h) | right

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"indices must be in [0, {self.n})")
        if x.size < SMALL:
            out = []
            for v in x.tolist():
                v = self._encrypt_int(v)
                while v >= self.n:
                    v = self._encrypt_int(v)
                out.append(v)
            return np.array(out, dtype=np.int64)
        y = self._encrypt(x.astype(np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():  # cycle-walking: stays inside [0, n), still a bijection
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


def epoch_key(seed: int, source: int, epoch: int) -> int:
    """The permutation key of one source's epoch."""
    return splitmix_int(splitmix_int(splitmix_int(seed & _M64) ^ source) ^ epoch)


def epoch_windows(seed: int, source: int, first: int, count: int, n_windows: int) -> np.ndarray:
    """[count] int64 window indices of the source's samples first, ..., first + count - 1."""
    if n_windows <= 0:
        raise ValueError(f"a source needs at least one window, got {n_windows}")
    k = np.arange(first, first + count, dtype=np.int64)
    epochs, pos = np.divmod(k, n_windows)
    out = np.empty(count, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = FeistelPermutation(n_windows, epoch_key(seed, source, int(e)))(pos[sel])
    return out

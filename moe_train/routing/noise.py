"""Counter-based random numbers: a pure function of (seed, global index).

Jitter and GShard's random second expert draw from here, keyed by the token's GLOBAL position,
so the same token gets the same noise whether the batch runs on 1 process or is split over N.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    """z >>> bits on int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (stable across processes and runs)."""
    z = torch.tensor(0, dtype=torch.int64)
    for p in parts:
        z = _splitmix(z ^ _signed(int(p) & ((1 << 64) - 1)))
    return int(z) & ((1 << 63) - 1)


def _splitmix(z: Tensor) -> Tensor:
    z = z + _GOLDEN
    z = (z ^ _logical_shift(z, 30)) * _MIX1
    z = (z ^ _logical_shift(z, 27)) * _MIX2
    return z ^ _logical_shift(z, 31)


def counter_uniform(seed: int, index: Tensor) -> Tensor:
    """Uniform [0, 1) float32 values, one per entry of `index` (int64), keyed by `seed`."""
    z = _splitmix(index.to(torch.int64) ^ _signed(seed & ((1 << 64) - 1)))
    z = _splitmix(z)
    return _logical_shift(z, 40).to(torch.float32) * (1.0 / (1 << 24))

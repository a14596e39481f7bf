"""Counter-based hashing behind the layout-invariant noise and init: SplitMix64 (Steele, Lea and
Flood 2014) on int64 tensors and Python ints, `mix_seed` (integers -> one seed: the init's
generators, the step's and every layer's noise seeds), `counter_uniform` (a pure function of
(seed, global index): GShard's random second expert) and the per-(row, column) noise of the
jitter, whose bits the C++/CUDA kernels (kernels/moe_ops_index.h) compute too.

A `Seed` is a Python int or a 0-d int64 tensor holding the same 64 bits (two's complement,
`seed_tensor`): compiled blocks take tensor seeds, so a new seed each step is new data, not a new
constant for dynamo to guard on and recompile for. Every function here gives the same bits for
both."""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

Seed = int | Tensor  # a Python int, or a 0-d int64 tensor of the same bits (seed_tensor)


def signed64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


def seed_tensor(seed: int, device: torch.device | str | None = None) -> Tensor:
    """The 0-d int64 tensor of `seed`'s 64 bits (what compiled blocks take, see the docstring)."""
    return torch.tensor(signed64(seed), dtype=torch.int64, device=device)


def _signed(seed: Seed) -> Tensor | int:
    """A seed as int64 arithmetic takes it: a tensor as it is, an int as signed64."""
    return seed if isinstance(seed, Tensor) else signed64(seed)


def _logical_shift(z: Tensor, bits: int) -> Tensor:
    """z >>> bits on int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix(z: Tensor) -> Tensor:
    """SplitMix64's step on int64 z (wrapping): mix(z + golden)."""
    z = z + signed64(GOLDEN)
    z = (z ^ _logical_shift(z, 30)) * signed64(_MIX1)
    z = (z ^ _logical_shift(z, 27)) * signed64(_MIX2)
    return z ^ _logical_shift(z, 31)


def splitmix_int(z: int) -> int:
    """splitmix on a Python int (unsigned 64-bit in, unsigned 64-bit out)."""
    z = (z + GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on values in [0, 2**32) held in int64."""
    m32 = (1 << 32) - 1
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & m32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & m32
    return h ^ (h >> 16)


def noise_uniform(seed: Seed, rows: Tensor, cols: int) -> Tensor:
    """U[0, 1) float32 [R, cols] with 24 random bits, a pure function of (seed, row, column):
    row key = low 32 bits of SplitMix64 output `row` of `seed` (rows: [R] int64 global indices),
    u = fmix32(key + column * golden32) >> 8, times 2^-24 (moe_ops::noise_uniform's bits)."""
    m32 = (1 << 32) - 1
    key = splitmix(rows.to(torch.int64) * signed64(GOLDEN) + _signed(seed)) & m32  # [R]
    col = (torch.arange(cols, device=rows.device) * (GOLDEN >> 32)) & m32  # [cols]
    h = _fmix32((key.unsqueeze(1) + col) & m32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def mix_bits(seed: Seed, index: Tensor) -> Tensor:
    """Two rounds of splitmix on index ^ seed (int64 tensor out)."""
    return splitmix(splitmix(index.to(torch.int64) ^ _signed(seed)))


def top24_uniform(z: Tensor) -> Tensor:
    """The top 24 bits of int64 z as a U[0, 1) float32."""
    return _logical_shift(z, 40).to(torch.float32) * (1.0 / (1 << 24))


@overload
def mix_seed(*parts: int) -> int: ...
@overload
def mix_seed(*parts: Seed) -> Seed: ...
def mix_seed(*parts: Seed) -> Seed:
    """Hash integers into one 63-bit seed (stable across processes and runs). Host arithmetic on
    ints; when a part is a tensor seed, the same bits as a 0-d int64 tensor (torch arithmetic,
    traced by dynamo without a constant to guard on)."""
    if not any(isinstance(p, Tensor) for p in parts):
        z = 0
        for p in parts:
            z = splitmix_int(z ^ (int(p) & _MASK64))
        return z & ((1 << 63) - 1)
    device = next(p for p in parts if isinstance(p, Tensor)).device
    t = torch.zeros((), dtype=torch.int64, device=device)
    for p in parts:
        t = splitmix(t ^ _signed(p))
    return t & ((1 << 63) - 1)


def counter_uniform(seed: Seed, index: Tensor) -> Tensor:
    """Uniform [0, 1) float32 values, one per entry of `index` (int64), keyed by `seed`."""
    return top24_uniform(mix_bits(seed, index))

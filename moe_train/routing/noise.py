"""Counter-based random numbers: a pure function of (seed, global index).

Jitter and GShard's random second expert draw from here, keyed by the token's GLOBAL position,
so the same token gets the same noise whether the batch runs on 1 process or is split over N.
The hash is SplitMix64 (moe_train.hashing), computed by the fused kernels for the jitter.
"""

from __future__ import annotations

from torch import Tensor

from .. import ops
from ..hashing import mix_bits, signed64, splitmix_int, top24_uniform


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (stable across processes and runs; host arithmetic)."""
    z = 0
    for p in parts:
        z = splitmix_int(z ^ (int(p) & ((1 << 64) - 1)))
    return z & ((1 << 63) - 1)


def counter_uniform(seed: int, index: Tensor) -> Tensor:
    """Uniform [0, 1) float32 values, one per entry of `index` (int64), keyed by `seed`."""
    return top24_uniform(mix_bits(seed, index))


def jitter(x: Tensor, seed: int, first_row: int, eps: float) -> Tensor:
    """x [T, d] float32 times U[1 - eps, 1 + eps) noise, one draw per (global row first_row + t,
    feature): the same noise for a token whatever the batch split, no loop, no generator state.
    Differentiable (the gradient is scaled by the same noise)."""
    return ops.jitter(x, seed & ((1 << 63) - 1), first_row, eps)


__all__ = ["counter_uniform", "jitter", "mix_seed", "signed64"]

"""The router's input jitter, keyed by counters: a pure function of (seed, global index).

Jitter and GShard's random second expert (RouteContext.uniform) draw keyed by the token's GLOBAL
position, so the same token gets the same noise whether the batch runs on 1 process or is split
over N. The hash is SplitMix64 (moe_train.ops.hashing); the fused gate (ops.gate) computes the
jitter's noise from the seed below.
"""

from __future__ import annotations

from ..ops.hashing import Seed, mix_seed

# The noise streams of one RouteKey, listed in one place so no two noises share a stream.
JITTER_STREAM = 1  # the input jitter (jitter_seed)
RANDOM_ROUTING_STREAM = 2  # GShard's random 2nd expert (RouteContext.uniform, topk.py)


def jitter_seed(noise_seed: Seed) -> Seed:
    """The jitter's seed (0 <= seed < 2**63, as ops.gate takes it) of one router call (a tensor
    seed in, a tensor seed out)."""
    return mix_seed(noise_seed, JITTER_STREAM) & ((1 << 63) - 1)


__all__ = ["JITTER_STREAM", "RANDOM_ROUTING_STREAM", "jitter_seed"]

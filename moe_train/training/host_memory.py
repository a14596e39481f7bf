"""The training process's host memory: keep freed blocks for the next step (trainer.host_memory).

glibc serves every block above 32 MiB with its own mmap and unmaps it on free, so each step's
large tensors (an expert bank's weight gradients are num_experts x a dense layer's) arrive as
fresh pages, and the kernel faults and zeroes every 4 KiB page again: at d 1024 with 16 experts
about 90-100k faults a step, a fifth to a quarter of a CPU layer's time (docs/RESULTS.md
section 9). ``reuse`` serves large blocks from the heap and never trims it, so the next step
takes the same pages back: what CUDA's caching allocator does for GPU memory. The process then
keeps its peak (measured +1-7 % max RSS on `model=base`). In the first few steps a large block
can land past a hole that small allocations have cut into, and is faulted in once; then the heap
settles. ``release`` leaves the C library's defaults.

Process-wide, for the rest of the process; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import platform
from functools import cache

HOST_MEMORY = ("reuse", "release")

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1  # value -1: never give the heap's free top back to the system
_M_MMAP_MAX = -4  # value 0: no block gets its own mmap (all come from the heap)


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") else None


def set_host_memory(mode: str) -> bool:
    """Apply trainer.host_memory to this process. True when glibc now keeps freed blocks
    (``reuse`` on glibc), False when nothing changed (``release``, or another C library)."""
    if mode not in HOST_MEMORY:
        raise ValueError(f"trainer.host_memory: got {mode!r}; allowed: {', '.join(HOST_MEMORY)}")
    libc = _glibc() if mode == "reuse" else None
    if libc is None:
        return False
    # each call returns 1 on success; mmap first, so no block is mapped once trimming is off
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1

"""trainer.host_memory: `reuse` makes glibc give a freed large block's pages back to the next
allocation (no fresh-page faults); `release` keeps the C library's default (they fault again).
Each case runs in its own process (slow tier): the setting is process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from moe_train.training.host_memory import set_host_memory

# allocate, touch and free a 64 MiB tensor again and again, as a training step does; count the
# minor faults of 8 such steps after 8 more that let the heap settle (the first few can land a
# block past a hole that small allocations have cut into: then it is faulted in once)
PROBE = """
import resource, sys, torch
from moe_train.training.host_memory import set_host_memory
print(set_host_memory(sys.argv[1]))
def touch():
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
for _ in range(8):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES = 16 * 2**20 * 4 // 4096  # 4 KiB pages of the tensor

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


def faults_of_8_steps(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.slow
@glibc
def test_reuse_gives_freed_pages_to_the_next_allocation():
    applied, faults = faults_of_8_steps("reuse")
    assert applied
    assert faults < PAGES  # the same pages every step: less than one tensor's faults in 8


@pytest.mark.slow
@glibc
def test_release_faults_fresh_pages_again():
    applied, faults = faults_of_8_steps("release")
    assert not applied
    assert faults > 4 * PAGES  # unmapped on free, faulted in again every step


def test_unknown_mode_names_the_field():
    with pytest.raises(ValueError, match=r"trainer\.host_memory.*reuse, release"):
        set_host_memory("never")

"""Fixtures of the kernel tests: the extension (built once per session, skipped without a C++
compiler) and fresh random generators (seed printed, shown by pytest on failure)."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from moe_train.ops import extension


@pytest.fixture(scope="session")
def ext() -> None:
    """Skip unless the fused kernels can be built; a failing build with a compiler is an error."""
    if extension.disabled():
        pytest.skip("MOE_TRAIN_NO_EXT is set: the extension is disabled")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler (install g++): the extension cannot be built")
    if not extension.load():
        pytest.fail(f"the extension failed to build: {extension._state['error']}")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed for each test (printed, so failures can be reproduced)."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed = {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def fused_cpu_dispatch(monkeypatch) -> None:
    """These tests exercise the fused dispatch kernel on CPU, which the library otherwise leaves
    to torch's own row gather there (it is as fast)."""
    from moe_train import ops

    monkeypatch.setattr(ops, "FUSED_CPU_DISPATCH", True)

"""GPU tests: every test here is marked `cuda` and skipped without a CUDA device
(`pytest -m cuda` runs them on a GPU machine; benchmarks/gpu_check.sh does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_ext() -> None:
    """The fused kernels, built with their CUDA part (a build failure on a GPU is an error)."""
    from moe_train import ops
    from moe_train.ops import extension

    assert ops.extension_available(), extension._state["error"]
    assert extension.has_cuda(), "the extension was built without its CUDA kernels"

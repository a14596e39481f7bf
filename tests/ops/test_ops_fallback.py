"""The reference fallback on CPU: MOE_TRAIN_NO_EXT=1, and no compiler (one warning saying how to
build); and no silent fallback on a machine with CUDA: a failed build stops the run with the
compiler's error (MOE_TRAIN_NO_EXT=1 is the way out).

The CPU cases run in subprocesses, since the extension is loaded once per process; the CUDA cases
mock CUDA in this process around a fresh build state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_train import ops
from moe_train.ops import extension

_CHECK = textwrap.dedent(
    """
    import warnings
    import torch
    from moe_train import ops
    from moe_train.ops.reference import combine_reference, dispatch_reference

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(10, 6, requires_grad=True)
        index = torch.tensor([3, 3, 0, 9, 1])
        w = torch.rand(5)
        for _ in range(2):
            buf = ops.dispatch(x, index)
            y = ops.combine(buf, w, index, 10)
        available = ops.extension_available()
    assert not available
    assert torch.equal(buf, dispatch_reference(x, index))
    assert torch.equal(y, combine_reference(buf, w, index, 10))
    y.sum().backward()
    assert x.grad is not None
    mine = [str(c.message) for c in caught if "moe_train.ops" in str(c.message)]
    print(len(mine))
    print(mine[0] if mine else "")
    """
)


def _run(env_update: dict[str, str], ext_dir) -> list[str]:
    env = {**os.environ, "MOE_TRAIN_EXT_DIR": str(ext_dir), **env_update}  # nothing prebuilt
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.slow
def test_no_ext_env_forces_reference_silently(tmp_path):
    lines = _run({"MOE_TRAIN_NO_EXT": "1"}, tmp_path / "ext")
    assert lines[0] == "0"


@pytest.mark.slow
def test_missing_compiler_warns_once_with_how_to_build(tmp_path):
    env = {"MOE_TRAIN_NO_EXT": "0", "CXX": "no-such-compiler", "PATH": str(tmp_path)}
    lines = _run(env, tmp_path / "ext")
    assert lines[0] == "1"
    assert "g++" in lines[1] and "python -m moe_train.ops.extension" in lines[1]


# --- a machine with CUDA: no silent fallback ---------------------------------------------------

PLANTED = "moe_train_planted_compile_error"


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A fresh per-process build state, an empty build folder, and kernels that fail to compile."""
    kernels = tmp_path / "kernels"
    shutil.copytree(extension.kernels_dir(), kernels)
    (kernels / "moe_ops.cpp").write_text(f"#error {PLANTED}\n")
    monkeypatch.setenv("MOE_TRAIN_KERNELS_DIR", str(kernels))
    monkeypatch.setenv("MOE_TRAIN_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("MOE_TRAIN_NO_EXT", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(extension, "_state", {**extension._state, "tried": False, "loaded": False,
                                          "error": None, "path": None})  # fmt: skip
    if extension._cxx() is None:
        pytest.skip("no C++ compiler: the build cannot fail the way this test needs")


def with_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))


@pytest.mark.slow
def test_failed_build_with_cuda_raises_the_compiler_error(fresh_build, monkeypatch):
    with_cuda(monkeypatch)
    with pytest.raises(extension.ExtensionBuildError) as err:
        extension.load()
    message = str(err.value)
    assert PLANTED in message  # the compiler's own output
    assert "MOE_TRAIN_NO_EXT=1" in message
    with pytest.raises(
        extension.ExtensionBuildError, match=PLANTED
    ):  # every call, not only the first
        ops.combine(torch.randn(3, 2), None, torch.tensor([0, 1, 1]), 2)


def test_cuda_without_a_toolkit_raises(fresh_build, monkeypatch, tmp_path):
    with_cuda(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    with pytest.raises(extension.ExtensionBuildError, match="no CUDA toolkit was found"):
        extension.load()


def test_no_ext_opt_out_with_cuda_uses_the_reference(fresh_build, monkeypatch):
    with_cuda(monkeypatch)
    monkeypatch.setenv("MOE_TRAIN_NO_EXT", "1")
    assert extension.load() is False
    y = ops.combine(torch.ones(3, 2), None, torch.tensor([0, 1, 1]), 2)
    assert torch.equal(y, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


@pytest.mark.slow
def test_failed_build_on_cpu_warns_and_falls_back(fresh_build, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference ops"):
        assert extension.load() is False
    assert extension.load() is False  # later calls: no error, no second warning needed

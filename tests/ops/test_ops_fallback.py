"""The reference fallback: MOE_TRAIN_NO_EXT=1, and no compiler (one warning saying how to build).

Run in subprocesses, since the extension is loaded once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def _run(env_update: dict[str, str]) -> list[str]:
    env = {**os.environ, **env_update}
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_no_ext_env_forces_reference_silently():
    lines = _run({"MOE_TRAIN_NO_EXT": "1"})
    assert lines[0] == "0"


def test_missing_compiler_warns_once_with_how_to_build(tmp_path):
    lines = _run({"MOE_TRAIN_NO_EXT": "0", "CXX": "no-such-compiler", "PATH": str(tmp_path)})
    assert lines[0] == "1"
    assert "g++" in lines[1] and "python -m moe_train.ops.build" in lines[1]

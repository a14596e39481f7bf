"""Python face of the row-moving ops: dispatch (gather rows) and combine (weighted row sums).

The fused C++/CUDA kernels (kernels/, registered as ``torch.ops.moe_train.*``) are built on first
use (or found prebuilt, see ``build``) and replace the plain-PyTorch references. If they cannot be
built, a machine with CUDA stops with the compiler's error; a CPU-only one runs the references
after one warning. ``MOE_TRAIN_NO_EXT=1`` forces the references. Both paths support autograd.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import build as _build
from .reference import combine_reference, dispatch_reference

# Run the fused dispatch on CPU even without a cast (the kernel tests do; see dispatch()).
FUSED_CPU_DISPATCH = os.environ.get("MOE_TRAIN_FUSED_CPU_DISPATCH") == "1"


def extension_available() -> bool:
    """True when the fused kernels are loaded (builds them on the first call; raises
    ``build.ExtensionBuildError`` when that fails on a machine with CUDA)."""
    return _build.load()


def _ext_for(device_type: str) -> bool:
    """Use the extension for tensors on this device type?

    Under torch.compile the answer is the eager one already made (a plain flag, so tracing
    never enters the build); no decorator here, which would import dynamo on every start."""
    if torch.compiler.is_compiling():
        loaded = bool(_build._state["loaded"])
        return loaded if device_type == "cpu" else loaded and bool(_build._state["cuda"])
    if device_type == "cpu":
        return _build.load()
    if device_type == "cuda":
        return _build.load() and _build.has_cuda()
    return False


def _check_index(index: Tensor, op: str) -> None:
    if index.dtype != torch.int64:
        raise TypeError(f"{op}: index must be int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: index must be 1-D [S], got shape {tuple(index.shape)}")


def dispatch(x: Tensor, index: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """buf[i] = x[index[i]]: x [T, d], index [S] int64 -> buf [S, d] (optionally cast)."""
    _check_index(index, "dispatch")
    if x.dim() != 2:
        raise ValueError(f"dispatch: x must be 2-D [T, d], got shape {tuple(x.shape)}")
    # On CPU a plain row gather (and its index_add backward) is as fast as ours or faster
    # (benchmarks/dispatch_combine.py): the fused op runs there only to fuse a dtype cast.
    fused_cast = out_dtype is not None and out_dtype != x.dtype
    if _ext_for(x.device.type) and (x.device.type != "cpu" or fused_cast or FUSED_CPU_DISPATCH):
        from . import _custom

        return _custom.dispatch(x, index, out_dtype)
    return dispatch_reference(x, index, out_dtype)


def combine(buf: Tensor, weight: Tensor | None, index: Tensor, num_rows: int) -> Tensor:
    """y[r] = sum_{s: index[s] = r} weight[s] * buf[s]: buf [S, d] -> y [num_rows, d].

    weight [S] (None = ones); accumulated in float32; y has buf's dtype.
    """
    _check_index(index, "combine")
    if buf.dim() != 2 or buf.shape[0] != index.shape[0]:
        raise ValueError(
            f"combine: buf must be [S, d] with S = len(index) = {index.shape[0]}, "
            f"got shape {tuple(buf.shape)}"
        )
    if weight is not None and tuple(weight.shape) != (index.shape[0],):
        raise ValueError(
            f"combine: weight must have shape [{index.shape[0]}], got {tuple(weight.shape)}"
        )
    if _ext_for(buf.device.type):
        from . import _custom

        return _custom.combine(buf, weight, index, num_rows)
    return combine_reference(buf, weight, index, num_rows)


__all__ = ["combine", "dispatch", "extension_available"]

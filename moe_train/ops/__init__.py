"""Python face of the row-moving ops: dispatch (gather rows) and combine (weighted row sums).

The fused C++/CUDA kernels (kernels/, registered as ``torch.ops.moe_train.*``) are built on first
use (or found prebuilt, see ``extension``) and replace the plain-PyTorch references. If they cannot be
built, a machine with CUDA stops with the compiler's error; a CPU-only one runs the references
after one warning. ``MOE_TRAIN_NO_EXT=1`` forces the references. Both paths support autograd.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension as _extension
from .hashing import Seed
from .indexing import count_values
from .reference import combine_reference, dispatch_reference, jitter_reference

# The fused dispatch on CPU also without a cast: its CSR backward beats index_add
# (benchmarks/dispatch_combine.py); MOE_TRAIN_FUSED_CPU_DISPATCH=0 routes it to torch's gather.
FUSED_CPU_DISPATCH = os.environ.get("MOE_TRAIN_FUSED_CPU_DISPATCH", "1") != "0"


def extension_available() -> bool:
    """True when the fused kernels are loaded (builds them on the first call; raises
    ``extension.ExtensionBuildError`` when that fails on a machine with CUDA)."""
    return _extension.load()


def _ext_for(device_type: str) -> bool:
    """Use the extension for tensors on this device type?

    Under torch.compile the answer is the eager one already made (a plain flag, so tracing
    never enters the build); no decorator here, which would import dynamo on every start."""
    if torch.compiler.is_compiling():
        loaded = bool(_extension._state["loaded"])
        return loaded if device_type == "cpu" else loaded and bool(_extension._state["cuda"])
    if device_type == "cpu":
        return _extension.load()
    if device_type == "cuda":
        return _extension.load() and _extension.has_cuda()
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
    fused_cast = out_dtype is not None and out_dtype != x.dtype
    if _ext_for(x.device.type) and (x.device.type != "cpu" or fused_cast or FUSED_CPU_DISPATCH):
        from . import _custom

        return _custom.dispatch(x, index, out_dtype)
    return dispatch_reference(x, index, out_dtype)


def group_by(index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Stable order of index [S] (values in [0, num_groups)) and the count of each value
    [num_groups] int64, on index's device without a host sync: a counting sort in C++ on CPU
    (O(S)), a stable torch.sort elsewhere."""
    _check_index(index, "group_by")
    if index.device.type == "cpu" and _ext_for("cpu"):
        row_ptr, order = torch.ops.moe_train.csr_by_row(index, num_groups)
        return order, row_ptr.diff()
    return torch.argsort(index, stable=True), count_values(index, num_groups)


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


def jitter(x: Tensor, seed: Seed, first_row: int | Tensor, eps: float) -> Tensor:
    """y = x * ((1 - eps) + 2 eps * u), u = U[0,1) keyed by (seed, (first_row + t) * d + f):
    x [T, d] float32 (the router's input) -> [T, d]. One fused pass (forward and backward) with
    the extension; the bit-identical torch reference otherwise (and for a tensor seed, as
    compiled blocks pass: inductor fuses the reference). seed: 0 <= seed < 2**63; first_row: an
    int, or a 0-d int64 tensor (compiled blocks)."""
    if x.dim() != 2:
        raise ValueError(f"jitter: x must be 2-D [T, d], got shape {tuple(x.shape)}")
    if (
        isinstance(seed, int)
        and isinstance(first_row, int)
        and x.dtype == torch.float32
        and _ext_for(x.device.type)
    ):
        from . import _custom

        return _custom.jitter(x, seed, first_row, eps)
    return jitter_reference(x, seed, first_row, eps)


def gate(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, seed: Seed = 0,
    first_row: int | Tensor = 0,
    eps: float = 0.0,
) -> Tensor:  # fmt: skip
    """The router's gate: logits [T, E] = jitter(x) @ weight^T + bias, x [T, d] and weight [E, d]
    float32; jitter as in `jitter` (none when eps = 0). On CPU with the extension one fused pass
    (the noise recomputed in the backward, never stored; BLAS runs these skinny shapes slowly);
    elsewhere (and for a tensor seed) jitter + F.linear (the same function)."""
    fused = x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
    if isinstance(seed, int) and isinstance(first_row, int) and fused and _ext_for("cpu"):
        from . import _custom

        logits = _custom.gate(x, weight, seed, first_row, eps)
        return logits if bias is None else logits + bias
    if eps > 0:
        x = jitter(x, seed, first_row, eps)
    return F.linear(x, weight, bias)


__all__ = ["combine", "dispatch", "extension_available", "gate", "group_by", "jitter"]

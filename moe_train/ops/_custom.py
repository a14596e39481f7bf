"""Python side of the ``moe_train`` custom ops: fake (meta) kernels for torch.compile, autograd,
and the CSR by destination row that makes combine gather-based and deterministic.

The schemas and the CPU/CUDA kernels are registered by the C++ extension (kernels/moe_ops.cpp);
``register()`` runs once after it is loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

_registered = False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def csr_by_row(index: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """CSR of slots by destination row: index [S] -> (row_ptr [num_rows+1], perm [S]).

    Slots of row r are perm[row_ptr[r]:row_ptr[r+1]], in slot order (stable sort). On CPU a C++
    counting sort (O(S + R), checks the range; torch.sort is slow on few contended cores); elsewhere
    torch.sort, where values outside [0, num_rows) fall outside every row.
    """
    if index.device.type == "cpu":
        return torch.ops.moe_train.csr_by_row(index, num_rows)
    return csr_by_sort(index, num_rows)


def csr_by_sort(index: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """csr_by_row with torch.sort and torch.searchsorted (any device)."""
    sorted_index, perm = torch.sort(index, stable=True)
    rows = torch.arange(num_rows + 1, device=index.device, dtype=index.dtype)
    return torch.searchsorted(sorted_index, rows), perm


# ---- fake kernels: shapes and dtypes only ----


def _csr_fake(index: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    return index.new_empty((num_rows + 1,)), index.new_empty(index.shape)  # [R+1], [S]


def _dispatch_fake(x: Tensor, index: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    return x.new_empty((index.shape[0], x.shape[1]), dtype=out_dtype or x.dtype)  # [S, d]


def _dispatch_backward_fake(
    grad_buf: Tensor, row_ptr: Tensor, perm: Tensor, num_rows: int, dtype: torch.dtype
) -> Tensor:
    return grad_buf.new_empty((num_rows, grad_buf.shape[1]), dtype=dtype)  # [T, d]


def _combine_fake(
    buf: Tensor,
    weight: Tensor | None,
    index: Tensor,
    row_ptr: Tensor,
    perm: Tensor,
    num_rows: int,
) -> Tensor:
    return buf.new_empty((num_rows, buf.shape[1]))  # [R, d]


def _combine_backward_fake(
    grad_y: Tensor, buf: Tensor, weight: Tensor | None, index: Tensor, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    slots = index.shape[0]
    grad_buf = grad_y.new_empty((slots, grad_y.shape[1]))  # [S, d]
    grad_w = grad_y.new_empty((slots if weight_grad else 0,), dtype=acc_dtype(grad_y.dtype))
    return grad_buf, grad_w


def _jitter_fake(x: Tensor, seed: int, first_row: int, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # [T, d]


def _gate_fake(x: Tensor, weight: Tensor, seed: int, first_row: int, eps: float) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))  # [T, E]


def _gate_backward_fake(
    grad: Tensor, x: Tensor, weight: Tensor, seed: int, first_row: int, eps: float,
    x_grad: bool, weight_grad: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return (
        x.new_empty((x.shape[0] if x_grad else 0, x.shape[1])),
        x.new_empty((weight.shape[0] if weight_grad else 0, x.shape[1])),
    )


# ---- autograd ----


def _gate_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, ctx.seed, ctx.first_row, ctx.eps = inputs
    ctx.save_for_backward(x, weight)


def _gate_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    """grad_x = n * (grad @ W), grad_W = grad^T @ (x * n): the noise n recomputed, not stored."""
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    gx, gw = torch.ops.moe_train.gate_backward(
        grad, x, weight, ctx.seed, ctx.first_row, ctx.eps, need_x, need_w
    )
    return (gx if need_x else None), (gw if need_w else None), None, None, None


def _jitter_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, ctx.seed, ctx.first_row, ctx.eps = inputs


def _jitter_backward(ctx, grad_y: Tensor):  # noqa: ANN001, ANN202
    """d(x * n)/dx = n: the same noise, recomputed from its counters instead of stored."""
    return torch.ops.moe_train.jitter(grad_y, ctx.seed, ctx.first_row, ctx.eps), None, None, None


def _dispatch_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, index, _ = inputs
    ctx.save_for_backward(index)
    ctx.num_rows = x.shape[0]
    ctx.x_dtype = x.dtype


def _dispatch_backward(ctx, grad_buf: Tensor):  # noqa: ANN001, ANN202
    """grad_x[t] = sum of grad_buf over slots with index == t (a gather-based segment sum)."""
    (index,) = ctx.saved_tensors
    row_ptr, perm = csr_by_row(index, ctx.num_rows)
    grad_x = torch.ops.moe_train.dispatch_backward(
        grad_buf, row_ptr, perm, ctx.num_rows, ctx.x_dtype
    )
    return grad_x, None, None


def _combine_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    buf, weight, index = inputs[:3]
    ctx.weight_grad = weight is not None and weight.requires_grad
    # buf is only needed for the weight gradient.
    ctx.save_for_backward(buf if ctx.weight_grad else None, weight, index)
    ctx.buf_meta = (buf.shape, buf.dtype)


def _combine_backward(ctx, grad_y: Tensor):  # noqa: ANN001, ANN202
    """grad_buf[s] = weight[s] * grad_y[index[s]], grad_weight[s] = dot(grad_y[index[s]], buf[s])."""
    buf, weight, index = ctx.saved_tensors
    weight_grad = ctx.weight_grad and ctx.needs_input_grad[1]
    if buf is None:
        buf = grad_y.new_empty((0, 0))
    grad_buf, grad_w = torch.ops.moe_train.combine_backward(grad_y, buf, weight, index, weight_grad)
    return grad_buf, (grad_w if weight_grad else None), None, None, None, None


def register() -> None:
    """Register fake kernels and autograd for the ops the extension defined (idempotent)."""
    global _registered
    if _registered:
        return
    lib = "moe_train::"
    torch.library.register_fake(lib + "csr_by_row")(_csr_fake)
    torch.library.register_fake(lib + "dispatch")(_dispatch_fake)
    torch.library.register_fake(lib + "dispatch_backward")(_dispatch_backward_fake)
    torch.library.register_fake(lib + "combine")(_combine_fake)
    torch.library.register_fake(lib + "combine_backward")(_combine_backward_fake)
    torch.library.register_fake(lib + "jitter")(_jitter_fake)
    torch.library.register_fake(lib + "gate")(_gate_fake)
    torch.library.register_fake(lib + "gate_backward")(_gate_backward_fake)
    torch.library.register_autograd(
        lib + "dispatch", _dispatch_backward, setup_context=_dispatch_setup
    )
    torch.library.register_autograd(
        lib + "combine", _combine_backward, setup_context=_combine_setup
    )
    torch.library.register_autograd(lib + "jitter", _jitter_backward, setup_context=_jitter_setup)
    torch.library.register_autograd(lib + "gate", _gate_backward, setup_context=_gate_setup)
    _registered = True


def dispatch(x: Tensor, index: Tensor, out_dtype: torch.dtype | None) -> Tensor:
    """Extension dispatch: x [T, d], index [S] -> [S, d]."""
    return torch.ops.moe_train.dispatch(x, index, out_dtype)


def combine(buf: Tensor, weight: Tensor | None, index: Tensor, num_rows: int) -> Tensor:
    """Extension combine: buf [S, d], weight [S] | None, index [S] -> [num_rows, d]."""
    if weight is not None:
        weight = weight.to(acc_dtype(buf.dtype))
    row_ptr, perm = csr_by_row(index, num_rows)
    return torch.ops.moe_train.combine(buf, weight, index, row_ptr, perm, num_rows)


def jitter(x: Tensor, seed: int, first_row: int, eps: float) -> Tensor:
    """Extension jitter: x [T, d] float32 -> x * noise [T, d]."""
    return torch.ops.moe_train.jitter(x, seed, first_row, eps)


def gate(x: Tensor, weight: Tensor, seed: int, first_row: int, eps: float) -> Tensor:
    """Extension gate (CPU): (x * jitter noise) @ weight^T -> [T, E]."""
    return torch.ops.moe_train.gate(x, weight, seed, first_row, eps)

"""Grouped FFN of the expert bank: every local expert on its contiguous segment of rows.

y[rows of e] = act(x[rows of e] @ w_in[e]) @ w_out[e], rows sorted by local expert. Two backends
compute the same function (tests compare them):

- ``grouped``: ``torch._grouped_mm`` with the segment ends as an int32 tensor on the device, so no
  host sync and one kernel per matmul. Used where torch runs it natively: CUDA sm_90/sm_100,
  bfloat16, torch >= 2.8, row strides of 16 bytes (widths multiple of 8); and on CPU on one
  thread or without the extension, where torch has a CPU kernel for the dtype (a C++ per-group
  loop, faster than our Python one). On other GPUs torch would fall back to a per-group loop
  that copies the offsets to the host.
- ``loop``: every expert's matmuls written in place into preallocated outputs (no ``cat`` of the
  outputs, no ``stack`` of the weight gradients), the activation and its backward over all rows
  at once. Needs the counts on the host. On CPU with the extension each of the six matmul passes
  is one op that places the threads across segments (kernels/moe_segment_mm_cpu.cpp: each small
  GEMM on one core, where torch's loop splits every one of them over all threads); else one
  ``torch.mm`` per segment. The CPU default with more than one thread when the extension is
  loaded.

- ``padded``: every segment zero-padded to the longest, two ``torch.bmm`` over [E, M, d] (one
  batched BLAS call per matmul instead of E small ones; padding rows cost compute, M E / S - 1
  of it). Opt-in: measured against the loop in benchmarks/moe_layer.py (docs/RESULTS.md).

``pick_backend`` chooses; ``MOE_TRAIN_EXPERT_BACKEND=loop|grouped`` (or ``ExpertBank.backend``)
forces one; ``MOE_TRAIN_SEGMENT_MM=0`` keeps the loop's one ``torch.mm`` per segment.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "grouped", "loop", "padded")


def activate(h: Tensor, activation: str) -> Tensor:
    """The FFN's nonlinearity: GELU (tanh) on h [.., h], or SwiGLU silu(gate) * up on the two
    halves of h [.., 2h] -> [.., h]. Shared by the experts and the dense FFN."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def activate_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """d(activate(h))/dh applied to grad [.., h] -> [.., h | 2h] (the shape of h)."""
    if activation != "swiglu":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    out = torch.empty_like(h)
    g_gate, g_up = out.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    torch.mul(grad, silu, out=g_up)
    # silu'(g) = sig * (1 + g * (1 - sig))
    torch.mul(grad * up, sig * (1 + gate * (1 - sig)), out=g_gate)
    return out


# ---- backend choice ------------------------------------------------------------------------


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _aligned(t: Tensor) -> bool:
    """Row strides and base pointer on 16-byte boundaries (the grouped kernels' requirement)."""
    n = 16 // t.element_size()
    return all(s % n == 0 for s in t.stride()[:-1]) and t.stride(-1) == 1 and t.data_ptr() % 16 == 0


def grouped_mm_supported(x: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """Does torch run ``_grouped_mm`` natively (one kernel, no host sync) for these operands?
    torch >= 2.8, CUDA sm_90 or sm_100 family, bfloat16, 16-byte row strides; the first call per
    device also checks the kernel against the loop on ragged groups (``_grouped_mm_checks_out``)."""
    if not hasattr(torch, "_grouped_mm") or _torch_version() < (2, 8):
        return False
    if x.device.type != "cuda" or torch.version.hip is not None:
        return False
    if not all(t.dtype == torch.bfloat16 for t in (x, w_in, w_out)):
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    if not ((major, minor) == (9, 0) or major == 10):  # torch's fast path: sm_90, sm_100 family
        return False
    widths_ok = x.shape[1] % 8 == 0 and w_in.shape[2] % 8 == 0 and w_out.shape[1] % 8 == 0
    if not (widths_ok and all(_aligned(t) for t in (x, w_in, w_out))):
        return False
    return _grouped_mm_checks_out(x.device.index or 0)


def _probe_hooks() -> torch.autograd.graph.saved_tensors_hooks:
    """Identity saved-tensor hooks for a probe's own autograd: innermost hooks win, so a probe run
    inside an activation-checkpointed forward (once, cached) saves nothing into the checkpoint,
    whose recomputation (probe cached, not run) must save the same tensors."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


@functools.cache
def _grouped_mm_checks_out(device_index: int) -> bool:
    """Once per device: grouped_ffn equals loop_ffn (forward and gradients, bf16 tolerance) on
    ragged groups with an empty one and sizes that are not multiples of 8. A failure (an older
    kernel's restriction) warns and keeps the loop."""
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device=dev).manual_seed(0)
    counts = [5, 0, 11, 3]
    x = torch.randn(sum(counts), 32, device=dev, generator=g)
    w_in = torch.randn(4, 32, 64, device=dev, generator=g) / 6
    w_out = torch.randn(4, 64, 32, device=dev, generator=g) / 8
    grad = torch.randn(sum(counts), 32, device=dev, generator=g)
    ends = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    results = []
    try:
        probes: list[tuple[Callable[..., Tensor], Any, torch.dtype]] = [
            (grouped_ffn, ends, torch.bfloat16),
            (loop_ffn, counts, torch.float32),
        ]
        for fn, arg, dtype in probes:
            leaves = [t.to(dtype).requires_grad_() for t in (x, w_in, w_out)]
            with _probe_hooks():
                y = fn(*leaves, arg, "gelu")
            grads = torch.autograd.grad(y, leaves, grad.to(dtype))
            results.append([y.float(), *(g.float() for g in grads)])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    except (AssertionError, RuntimeError) as e:
        why = f"torch._grouped_mm (torch {torch.__version__}) failed or disagreed with the loop"
        warnings.warn(f"{why} on ragged groups; using the loop. {e}", RuntimeWarning, stacklevel=3)
        return False
    return True


@functools.cache
def _grouped_mm_on_cpu(dtype: torch.dtype) -> bool:
    """Does this torch run ``_grouped_mm`` (with autograd) on CPU tensors of this dtype? Probed
    once per dtype: torch 2.8 had no CPU kernel; 2.13 runs a per-group loop in C++."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(3, 8, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 8, 8, dtype=dtype, requires_grad=True)
        with _probe_hooks():
            y = torch._grouped_mm(x, w, offs=torch.tensor([1, 3], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        return bool(torch.equal(y.float(), torch.full((3, 8), 8.0)) and w.grad is not None)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def pick_backend(x: Tensor, w_in: Tensor, w_out: Tensor, requested: str = "auto") -> str:
    """'grouped', 'loop' or 'padded' for these operands: `requested` (or $MOE_TRAIN_EXPERT_BACKEND) when
    not 'auto', else grouped where torch runs it natively on the GPU; on CPU with more than one
    thread the loop when the extension's segment matmuls are loaded, else torch's grouped loop
    where it has one; loop otherwise."""
    want = os.environ.get("MOE_TRAIN_EXPERT_BACKEND") or requested
    if want not in BACKENDS:
        raise ValueError(f"expert backend: got {want!r}; allowed: {', '.join(BACKENDS)}")
    cpu_grouped = x.device.type == "cpu" and _grouped_mm_on_cpu(x.dtype)
    if want == "grouped":
        if x.device.type == "cpu" and not cpu_grouped:
            why = f"torch {torch.__version__} has no CPU _grouped_mm for {x.dtype}"
            raise RuntimeError(f"expert backend 'grouped': {why}; use 'loop' or 'auto'")
        return "grouped"
    if want in ("loop", "padded"):
        return want
    if x.device.type == "cpu":
        # with threads, the loop over the extension's segment matmuls (threads placed across
        # segments) beats torch's per-group loop (each small GEMM split over all threads); on one
        # thread there is nothing to place and torch's C++ loop is as fast, and without the
        # extension it beats our Python loop by 5-15 % of the layer (docs/RESULTS.md section 9)
        threaded = torch.get_num_threads() > 1 and _segment_kernels()
        return "loop" if threaded or not cpu_grouped else "grouped"
    return "grouped" if grouped_mm_supported(x, w_in, w_out) else "loop"


# ---- the two backends ----------------------------------------------------------------------


def grouped_ffn(x: Tensor, w_in: Tensor, w_out: Tensor, ends: Tensor, activation: str) -> Tensor:
    """x: [S, d], w_in: [E, d, W], w_out: [E, h, d], ends: [E] int32 cumulative row counts on
    x's device -> [S, d] (torch's autograd for _grouped_mm)."""
    h = torch._grouped_mm(x, w_in, offs=ends)  # [S, W]
    return torch._grouped_mm(activate(h, activation), w_out, offs=ends)


class _Segments:
    """The loop backend's per-expert matmuls over segments of rows (host counts [E]).

    On CPU with the extension (kernels/moe_segment_mm_cpu.cpp) each call is one op that places
    the threads across segments (each small GEMM on one core); elsewhere one ``torch.mm`` per
    segment into a slice of the output. Both compute every GEMM of the per-expert definition."""

    def __init__(self, counts: list[int], device: torch.device):
        self.counts = counts
        self.ends = list(itertools.accumulate(counts))
        self.bounds = [(e, b - n, b) for e, (n, b) in enumerate(zip(counts, self.ends)) if n]
        self.fused = device.type == "cpu" and _segment_kernels()

    def rows(self, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        """out[rows of e] = a[rows of e] @ b[e]; a [S, k], b [E, k, n], out [S, n]."""
        if self.fused:
            torch.ops.moe_train.segment_mm(a, b, self.ends, out)
        else:
            for e, lo, hi in self.bounds:
                torch.mm(a[lo:hi], b[e], out=out[lo:hi])
        return out

    def weights(self, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
        """out[e] = a[rows of e]^T @ b[rows of e] (zeros for an expert without rows);
        a [S, m], b [S, n], out [E, m, n] contiguous."""
        if self.fused:
            torch.ops.moe_train.segment_mm_t(a, b, self.ends, out)
            return out
        for e, n in enumerate(self.counts):
            if n == 0:
                out[e].zero_()
        for e, lo, hi in self.bounds:
            torch.mm(a[lo:hi].t(), b[lo:hi], out=out[e])
        return out


def _segment_kernels() -> bool:
    """The extension's segment matmuls are loaded (and not switched off by
    MOE_TRAIN_SEGMENT_MM=0, which keeps one torch.mm per segment)."""
    if os.environ.get("MOE_TRAIN_SEGMENT_MM", "1") == "0":
        return False
    from ..ops import extension_available

    return extension_available() and hasattr(torch.ops.moe_train, "segment_mm")


def _loop_forward(
    x: Tensor, w_in: Tensor, w_out: Tensor, seg: _Segments, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [S, d], h [S, W], act [S, h]): every matmul into a slice of one preallocated output."""
    h = seg.rows(x, w_in, x.new_empty(x.shape[0], w_in.shape[2]))  # [S, W]
    act = activate(h, activation)  # [S, h]
    y = seg.rows(act, w_out, x.new_empty(x.shape[0], w_out.shape[2]))  # [S, d]
    return y, h, act


def _loop_backward(
    grad_y: Tensor,
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    h: Tensor,
    act: Tensor,
    seg: _Segments,
    activation: str,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of x, w_in, w_out (those `needs` asks for), written in place per segment."""
    need_x, need_w_in, need_w_out = needs
    grad_y = grad_y.contiguous()
    grad_act = seg.rows(grad_y, w_out.transpose(1, 2), torch.empty_like(act))  # [S, h]
    grad_w_out = seg.weights(act, grad_y, _empty_like(w_out)) if need_w_out else None
    grad_h = activate_backward(grad_act, h, activation)
    grad_x = seg.rows(grad_h, w_in.transpose(1, 2), torch.empty_like(x)) if need_x else None
    grad_w_in = seg.weights(x, grad_h, _empty_like(w_in)) if need_w_in else None
    return grad_x, grad_w_in, grad_w_out


class _LoopFFN(torch.autograd.Function):
    """The loop backend with a hand-written backward: every matmul writes into a slice of one
    preallocated output, so neither direction concatenates segments or stacks weight grads."""

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], activation: str):
        seg = _Segments(counts, x.device)
        y, h, act = _loop_forward(x, w_in, w_out, seg, activation)
        ctx.save_for_backward(x, w_in, w_out, h, act)
        ctx.seg, ctx.activation = seg, activation
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, w_in, w_out, h, act = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grads = _loop_backward(grad_y, x, w_in, w_out, h, act, ctx.seg, ctx.activation, needs)
        return (*grads, None, None)


def _empty_like(w: Tensor) -> Tensor:
    """An uninitialised contiguous gradient of w [E, ...] (the segment ops fill every expert)."""
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def loop_ffn(x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], activation: str) -> Tensor:
    """The loop backend: x [S, d] sorted by expert, counts [E] host ints -> [S, d]."""
    return _LoopFFN.apply(x, w_in, w_out, counts, activation)


def padded_ffn(
    x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], activation: str
) -> Tensor:
    """The padded backend: x [S, d] sorted by expert, counts [E] host ints -> [S, d]. Zero rows
    pad each segment to M = max(counts); they stay zero through both matmuls (act(0) = 0 for
    GELU and SwiGLU), so neither the output nor the weight gradients see them."""
    E, M, S = len(counts), max(counts, default=0), x.shape[0]
    sizes = torch.tensor(counts, device=x.device)
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), sizes, output_size=S)
    starts = sizes.cumsum(0) - sizes  # [E] first row of each segment
    slot = expert * M + torch.arange(S, device=x.device) - starts[expert]  # [S] row in [E * M]
    xp = x.new_zeros(E * M, x.shape[1]).index_copy(0, slot, x).view(E, M, -1)  # [E, M, d]
    act = activate(torch.bmm(xp, w_in), activation)  # [E, M, h]
    return torch.bmm(act, w_out).view(E * M, -1).index_select(0, slot)  # [S, d]


# ---- the loop backend as an opaque op, for torch.compile ---------------------------------------
# Under torch.compile the loop's host-side counts would break the graph (and _grouped_mm's fake
# kernel accepts bf16 only): the loop runs as one custom op whose fake kernel gives the shapes,
# so dynamo traces straight through the expert bank; the op reads the counts inside, eagerly.


@torch.library.custom_op("moe_train::expert_loop_ffn", mutates_args=())
def _loop_ffn_op(
    x: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [S, d], h [S, W], act [S, h]) of the loop backend; h and act are kept for backward."""
    return _loop_forward(x, w_in, w_out, _Segments(counts.tolist(), x.device), activation)


@_loop_ffn_op.register_fake
def _(x, w_in, w_out, counts, activation):
    h = x.new_empty(x.shape[0], w_in.shape[2])
    act = x.new_empty(x.shape[0], w_out.shape[1])
    return x.new_empty(x.shape[0], w_out.shape[2]), h, act


@torch.library.custom_op("moe_train::expert_loop_ffn_backward", mutates_args=())
def _loop_ffn_backward_op(
    grad_y: Tensor,
    x: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    h: Tensor,
    act: Tensor,
    counts: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    seg = _Segments(counts.tolist(), x.device)
    gx, gw_in, gw_out = _loop_backward(
        grad_y, x, w_in, w_out, h, act, seg, activation, (True, True, True)
    )
    assert gx is not None and gw_in is not None and gw_out is not None  # all three asked for
    return gx, gw_in, gw_out


@_loop_ffn_backward_op.register_fake
def _(grad_y, x, w_in, w_out, h, act, counts, activation):
    return torch.empty_like(x), torch.empty_like(w_in), torch.empty_like(w_out)


def _loop_op_setup(ctx, inputs, output) -> None:
    x, w_in, w_out, counts, activation = inputs
    _, h, act = output
    ctx.save_for_backward(x, w_in, w_out, h, act, counts)
    ctx.activation = activation


def _loop_op_backward(ctx, grad_y, grad_h, grad_act):
    x, w_in, w_out, h, act, counts = ctx.saved_tensors
    gx, gw_in, gw_out = _loop_ffn_backward_op(
        grad_y.contiguous(), x, w_in, w_out, h, act, counts, ctx.activation
    )
    return gx, gw_in, gw_out, None, None


_loop_ffn_op.register_autograd(_loop_op_backward, setup_context=_loop_op_setup)


def loop_ffn_op(x: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor, activation: str) -> Tensor:
    """loop_ffn with the counts as a tensor, as one traceable op (torch.compile)."""
    return _loop_ffn_op(x, w_in, w_out, counts, activation)[0]

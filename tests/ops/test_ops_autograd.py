"""Gradients, thread-count independence, torch.compile and opcheck of the fused ops."""

from __future__ import annotations

import pytest
import torch

from moe_train import ops
from moe_train.ops._custom import csr_by_row, csr_by_sort
from moe_train.ops.reference import combine_reference, dispatch_reference
from tests.helpers.ops_cases import CASES, make_index, randn

pytestmark = pytest.mark.usefixtures("ext")


def _layer(dispatch, combine, x, weight, index, rows):
    """dispatch -> a per-slot nonlinearity -> weighted combine, as an MoE layer does."""
    return combine(torch.tanh(dispatch(x, index)), weight, index, rows)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case, gen):
    index, rows = make_index(case, gen)
    index, rows = index[:12], min(rows, 40)  # small; keeps index in range
    index = index.clamp(max=rows - 1)
    x = randn(rows, 5, dtype=torch.float64, gen=gen).requires_grad_()
    w = torch.rand(index.shape[0], dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: _layer(ops.dispatch, ops.combine, x, w, index, rows), (x, w)
    )
    assert torch.autograd.gradcheck(lambda x: ops.combine(x[index], None, index, rows), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype, gen):
    index, rows = make_index("random", gen)
    x0 = randn(rows, 40, dtype=dtype, gen=gen)
    w0 = torch.rand(index.shape[0], generator=gen)
    grads = []
    for disp, comb in ((ops.dispatch, ops.combine), (dispatch_reference, combine_reference)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = _layer(disp, comb, x, w, index, rows)
        y.backward(torch.ones_like(y))
        grads.append((x.grad, w.grad))
    (gx, gw), (rx, rw) = grads
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


def test_dispatch_cast_gradient_has_input_dtype(gen):
    x = randn(30, 16, dtype=torch.float32, gen=gen).requires_grad_()
    index = torch.randint(0, 30, (50,), generator=gen)
    ops.dispatch(x, index, torch.bfloat16).float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, torch.bincount(index, minlength=30).float()[:, None].expand(30, 16))


def test_combine_deterministic_across_thread_counts(gen):
    index = torch.randint(0, 2048, (8192,), generator=gen)  # large enough to run in parallel
    buf = randn(8192, 96, dtype=torch.bfloat16, gen=gen).requires_grad_()
    w = torch.rand(8192, generator=gen).requires_grad_()
    g = randn(2048, 96, dtype=torch.bfloat16, gen=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            buf.grad = w.grad = None
            y = ops.combine(buf, w, index, 2048)
            y.backward(g)
            results.append((y, buf.grad, w.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(gen):
    index = torch.randint(0, 64, (128,), generator=gen)

    def f(x, w):
        return ops.combine(ops.dispatch(x, index, torch.bfloat16), w, index, 64)

    x = randn(64, 32, dtype=torch.float32, gen=gen).requires_grad_()
    w = torch.rand(128, generator=gen).requires_grad_()
    compiled = torch.compile(f, fullgraph=True)  # inductor around the custom ops
    y = compiled(x, w)
    torch.testing.assert_close(y, f(x, w))
    y.float().sum().backward()
    assert x.grad is not None and w.grad is not None


def test_opcheck(gen):
    index = torch.randint(0, 20, (48,), generator=gen)
    row_ptr, perm = csr_by_row(index, 20)
    x = torch.randn(20, 24, generator=gen, requires_grad=True)
    buf = torch.randn(48, 24, generator=gen, requires_grad=True)
    w = torch.rand(48, generator=gen, requires_grad=True)
    m = torch.ops.moe_train
    torch.library.opcheck(m.dispatch, (x, index, None))
    torch.library.opcheck(m.dispatch, (x, index, torch.bfloat16))
    torch.library.opcheck(m.combine, (buf, w, index, row_ptr, perm, 20))
    torch.library.opcheck(m.combine, (buf, None, index, row_ptr, perm, 20))
    g = torch.randn(20, 24, generator=gen)
    torch.library.opcheck(m.combine_backward, (g, buf.detach(), w.detach(), index, True))
    torch.library.opcheck(m.dispatch_backward, (buf.detach(), row_ptr, perm, 20, torch.float32))


def test_csr_counting_sort_matches_stable_argsort(gen):
    for case in CASES:
        index, rows = make_index(case, gen)
        got = csr_by_row(index, rows)
        want = csr_by_sort(index, rows)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), case
    torch.library.opcheck(torch.ops.moe_train.csr_by_row, (index, rows))

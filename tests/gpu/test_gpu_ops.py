"""The CUDA kernels against the PyTorch reference: dispatch, combine and their backward passes in
fp32/bf16/fp16, empty inputs, more than 2**31 elements, out-of-range rows (device-side assert),
the jitter noise (bit for bit with the CPU) and group_by."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from moe_train import ops
from moe_train.ops.reference import combine_reference, dispatch_reference, jitter_reference

pytestmark = pytest.mark.usefixtures("cuda_ext")
DEV = "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def index_cases(gen: torch.Generator) -> dict[str, tuple[torch.Tensor, int]]:
    """name -> (index [S] on the GPU, rows): the edge cases of tests/helpers/ops_cases.py."""
    cases = {
        "random": (torch.randint(0, 300, (600,), generator=gen), 300),
        "rows_without_slots": (3 * torch.randint(0, 30, (150,), generator=gen), 90),
        "all_to_one_row": (torch.full((120,), 7, dtype=torch.int64), 40),
        "dropped_slots": (torch.randperm(200, generator=gen)[:50], 200),
        "single_row": (torch.zeros(3, dtype=torch.int64), 1),
    }
    return {k: (i.to(DEV), r) for k, (i, r) in cases.items()}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 13, 1000])
def test_dispatch_combine_forward_backward_match_reference(dtype, d, gen):
    for name, (index, rows) in index_cases(gen).items():
        x0 = torch.randn(rows, d, generator=gen).to(DEV, dtype)
        w0 = torch.rand(index.shape[0], generator=gen).to(DEV)
        out = []
        for disp, comb in ((ops.dispatch, ops.combine), (dispatch_reference, combine_reference)):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            buf = disp(x, index)
            y = comb(torch.tanh(buf.float()).to(dtype), w, index, rows)
            y.backward(torch.ones_like(y))
            out.append((buf, y, x.grad, w.grad))
        (buf, y, gx, gw), (rbuf, ry, rgx, rgw) = out
        assert torch.equal(buf, rbuf), name
        tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(y, ry, msg=name, **tol)
        torch.testing.assert_close(gx, rgx, msg=name, **tol)
        torch.testing.assert_close(gw, rgw, msg=name, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dispatch_fused_cast(dtype, out_dtype, gen):
    index, rows = index_cases(gen)["random"]
    x = torch.randn(rows, 40, generator=gen).to(DEV, dtype)
    assert torch.equal(ops.dispatch(x, index, out_dtype), dispatch_reference(x, index, out_dtype))


def test_combine_is_deterministic(gen):
    index = torch.randint(0, 512, (8192,), generator=gen).to(DEV)
    buf = torch.randn(8192, 256, generator=gen).to(DEV, torch.bfloat16)
    w = torch.rand(8192, generator=gen).to(DEV)
    first = ops.combine(buf, w, index, 512)
    assert all(torch.equal(first, ops.combine(buf, w, index, 512)) for _ in range(5))


def test_empty_inputs():
    x = torch.randn(5, 8, device=DEV, requires_grad=True)
    none = torch.zeros(0, dtype=torch.int64, device=DEV)
    buf = ops.dispatch(x, none)
    assert buf.shape == (0, 8)
    y = ops.combine(buf, torch.zeros(0, device=DEV), none, 5)
    assert torch.equal(y, torch.zeros(5, 8, device=DEV))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 8, device=DEV))
    assert ops.combine(torch.zeros(0, 8, device=DEV), None, none, 0).shape == (0, 8)
    assert ops.jitter(torch.zeros(0, 8, device=DEV), 1, 0, 0.1).shape == (0, 8)


def test_more_than_2_pow_31_elements():
    """Row offsets in int64: rows x d > 2**31 elements in x, buf and y (bf16, about 17 GB)."""
    rows, d = 65_600, 32_768  # 2.15e9 elements
    need = 4 * rows * d * 2 + 2**30
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    x = torch.zeros(rows, d, device=DEV, dtype=torch.bfloat16)
    x[:, :8] = torch.arange(rows, device=DEV, dtype=torch.float32).remainder(251).unsqueeze(1)
    x[:, -8:] = 3.0
    index = torch.arange(rows - 1, -1, -1, device=DEV)  # reversed rows
    buf = ops.dispatch(x, index)
    last = rows - 1
    assert torch.equal(buf[0], x[last]) and torch.equal(buf[last], x[0])
    del x
    y = ops.combine(buf, None, index, rows)
    assert torch.equal(y[last], buf[0]) and torch.equal(y[0, -8:], buf[last, -8:])
    grad_buf, _ = torch.ops.moe_train.combine_backward(y, buf, None, index, False)
    assert torch.equal(grad_buf[last], y[0]) and torch.equal(grad_buf[0, :8], y[last, :8])


BAD_ROWS = {
    "dispatch": "ops.dispatch(torch.randn(4, 8, device='cuda'), torch.tensor([0, 9], device='cuda'))",
    "combine": "ops.combine(torch.randn(2, 8, device='cuda'), None, "
    "torch.tensor([0, 9], device='cuda'), 4)",
    "combine_backward": "torch.ops.moe_train.combine_backward(torch.randn(4, 8, device='cuda'), "
    "torch.randn(2, 8, device='cuda'), None, torch.tensor([0, -1], device='cuda'), False)",
}


@pytest.mark.parametrize("op", sorted(BAD_ROWS))
def test_out_of_range_rows_fail_with_a_device_side_assert(op):
    """A device assert poisons the CUDA context, so each case runs in its own process."""
    code = textwrap.dedent(
        f"""
        import torch
        from moe_train import ops
        assert ops.extension_available()
        {BAD_ROWS[op]}
        torch.cuda.synchronize()
        print("NO ERROR")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr or "Assertion" in proc.stderr, proc.stderr[-3000:]


def test_jitter_on_the_gpu_is_bit_identical_to_the_cpu(gen):
    x = torch.randn(300, 77, generator=gen)
    for seed, first, eps in ((0, 0, 0.01), (2**63 - 1, 1000, 0.3), (987654321987, 2**40, 0.1)):
        gpu = ops.jitter(x.to(DEV), seed, first, eps).cpu()
        assert torch.equal(gpu, jitter_reference(x, seed, first, eps))
        assert torch.equal(gpu, jitter_reference(x.to(DEV), seed, first, eps).cpu())
        assert torch.equal(gpu, ops.jitter(x, seed, first, eps))  # the CPU kernel


def test_group_by_on_the_gpu(gen):
    index = torch.randint(0, 7, (5000,), generator=gen).to(DEV)
    order, counts = ops.group_by(index, 9)
    assert torch.equal(order, torch.argsort(index, stable=True))
    assert torch.equal(counts, torch.bincount(index, minlength=9))

"""The expert bank's segment matmuls on CPU (kernels/moe_segment_mm_cpu.cpp) against the
per-segment torch.mm definition, at 1 thread (the same GEMMs in order) and 2 (threads placed
across segments), and the loop backend through them against the loop without them."""

from __future__ import annotations

import pytest
import torch

from moe_train.experts.grouped import loop_ffn

pytestmark = pytest.mark.usefixtures("ext")

COUNTS = {
    "ragged": [5, 0, 11, 3, 0, 7],  # empty experts, sizes that are not multiples of 8
    "one_big": [200, 1, 0, 3],  # one expert holds more than a thread's share of the rows
    "all_empty": [0, 0, 0],
    "one_expert": [9],
}


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def ends_of(counts: list[int]) -> list[int]:
    return torch.tensor(counts).cumsum(0).tolist()


def rows_definition(a, b, counts):
    """out[rows of e] = a[rows of e] @ b[e]."""
    return torch.cat([s @ b[e] for e, s in enumerate(a.split(counts))])


def weights_definition(a, b, counts):
    """out[e] = a[rows of e]^T @ b[rows of e]."""
    pairs = zip(a.split(counts), b.split(counts))
    return torch.stack([sa.t() @ sb for sa, sb in pairs])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_segment_mm_equals_the_per_segment_definition(case, dtype, threads, gen):
    counts = COUNTS[case]
    S, E = sum(counts), len(counts)
    a = torch.randn(S, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(E, 20, 12, generator=gen, dtype=torch.float64)  # used transposed: strided
    out = torch.full((S, 20), float("nan"), dtype=dtype)
    torch.ops.moe_train.segment_mm(a.to(dtype), w.to(dtype).transpose(1, 2), ends_of(counts), out)
    want = rows_definition(a, w.transpose(1, 2), counts)
    tol = dict(atol=0, rtol=0) if dtype == torch.float64 and threads == 1 else {}
    if dtype == torch.bfloat16:
        tol = dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_segment_mm_t_equals_the_per_segment_definition(case, dtype, threads, gen):
    counts = COUNTS[case]
    S, E = sum(counts), len(counts)
    a = torch.randn(S, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(S, 33, generator=gen, dtype=torch.float64)
    out = torch.full((E, 12, 33), float("nan"), dtype=dtype)  # every expert is written
    torch.ops.moe_train.segment_mm_t(a.to(dtype), b.to(dtype), ends_of(counts), out)
    want = weights_definition(a, b, counts)
    tol = dict(atol=0.2, rtol=0.02) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.double(), want, **tol)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.all(out[e] == 0)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_loop_backend_through_the_segment_ops_equals_the_loop_without(
    activation, threads, gen, monkeypatch
):
    counts = COUNTS["ragged"]
    width = 48 if activation == "swiglu" else 24
    x = torch.randn(sum(counts), 16, generator=gen, dtype=torch.float64)
    w_in = torch.randn(len(counts), 16, width, generator=gen, dtype=torch.float64) / 4
    w_out = torch.randn(len(counts), 24, 16, generator=gen, dtype=torch.float64) / 5
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("MOE_TRAIN_SEGMENT_MM", fused)
        leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out)]
        y = loop_ffn(*leaves, counts, activation)
        results.append([y, *torch.autograd.grad(y, leaves, grad)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "ends, match",
    [([3, 2, 6], "non-decreasing"), ([1, 2, 5], r"last end \(5\) must equal the rows of a \(6\)")],
)
def test_bad_segment_ends_are_named(ends, match):
    a, b = torch.randn(6, 4), torch.randn(3, 4, 5)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe_train.segment_mm(a, b, ends, torch.empty(6, 5))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.moe_train.segment_mm_t(a, torch.randn(6, 5), ends, torch.empty(3, 4, 5))
    with pytest.raises(RuntimeError, match="2 ends for 3 experts"):
        torch.ops.moe_train.segment_mm(a, b, [2, 6], torch.empty(6, 5))

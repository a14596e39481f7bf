"""Fused dispatch/combine kernels vs the PyTorch reference, forward, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_train import ops
from moe_train.ops.reference import combine_reference, dispatch_reference
from tests.helpers.ops_cases import CASES, DTYPES, layouts, make_index, randn

pytestmark = pytest.mark.usefixtures("ext")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("d", [64, 13])
def test_dispatch_matches_reference(dtype, case, d, gen):
    index, rows = make_index(case, gen)
    x = randn(rows, d, dtype=dtype, gen=gen)
    for name, xl in layouts(x).items():
        assert torch.equal(ops.dispatch(xl, index), dispatch_reference(x, index)), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dispatch_fused_cast(dtype, out_dtype, gen):
    index, rows = make_index("random", gen)
    x = randn(rows, 40, dtype=dtype, gen=gen)
    buf = ops.dispatch(x, index, out_dtype)
    assert buf.dtype == out_dtype
    assert torch.equal(buf, dispatch_reference(x, index, out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("d", [72, 13])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_matches_reference(dtype, case, d, weighted, gen):
    index, rows = make_index(case, gen)
    buf = randn(index.shape[0], d, dtype=dtype, gen=gen)
    weight = torch.rand(index.shape[0], generator=gen) if weighted else None
    want = combine_reference(buf, weight, index, rows)
    for name, bl in layouts(buf).items():
        got = ops.combine(bl, weight, index, rows)
        assert got.dtype == dtype and got.shape == (rows, d)
        # Both accumulate in float32 and round once; only the rounding of the sum may differ.
        torch.testing.assert_close(got, want, msg=name)


def test_noncontiguous_index_and_weight(gen):
    index, rows = make_index("random", gen)
    index2 = torch.stack([index, index]).t().reshape(-1)[::2]  # stride 2
    weight = torch.rand(2 * index.shape[0], generator=gen)[::2]
    x = randn(rows, 24, dtype=torch.float32, gen=gen)
    buf = ops.dispatch(x, index2)
    assert torch.equal(buf, x[index])
    torch.testing.assert_close(
        ops.combine(buf, weight, index2, rows), combine_reference(buf, weight, index, rows)
    )


def test_empty_inputs():
    x = torch.randn(4, 8)
    empty = torch.zeros(0, dtype=torch.int64)
    assert ops.dispatch(x, empty).shape == (0, 8)
    assert torch.equal(ops.combine(torch.zeros(0, 8), None, empty, 5), torch.zeros(5, 8))
    assert ops.combine(torch.zeros(3, 0), None, torch.tensor([0, 1, 1]), 2).shape == (2, 0)


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_python_face_uses_the_extension():
    assert ops.extension_available()
    with _RecordOps() as rec:
        buf = ops.dispatch(torch.randn(5, 8), torch.tensor([0, 4, 4]))
        ops.combine(buf, torch.rand(3), torch.tensor([0, 4, 4]), 5)
    assert "moe_train.dispatch.default" in rec.names
    assert "moe_train.combine.default" in rec.names


def test_bad_inputs_name_the_problem():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="index must be int64"):
        ops.dispatch(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dispatch(x, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match=r"index\[1\] = 5 is out of range"):
        ops.combine(torch.randn(2, 8), None, torch.tensor([0, 5]), 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.combine(torch.randn(2, 8), torch.ones(3), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="buf must be"):
        ops.combine(torch.randn(3, 8), None, torch.tensor([0, 1]), 4)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.dispatch(torch.ones(4, 8, dtype=torch.int32), torch.tensor([0]))


def test_cpu_dispatch_without_cast_uses_torch_gather(monkeypatch):
    """On CPU the library routes a plain dispatch to torch's gather and a cast to the fused op."""
    monkeypatch.setattr(ops, "FUSED_CPU_DISPATCH", False)
    seen = []
    monkeypatch.setattr(
        "moe_train.ops._custom.dispatch", lambda x, i, dt: seen.append(dt) or x[i].to(dt or x.dtype)
    )
    x, index = torch.randn(5, 3), torch.tensor([4, 0, 0])
    assert torch.equal(ops.dispatch(x, index), x[index]) and seen == []
    assert ops.dispatch(x, index, torch.bfloat16).dtype == torch.bfloat16 and seen == [
        torch.bfloat16
    ]

"""The fused jitter and gate ops against their references; group_by; the range checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_train import ops
from moe_train.ops._custom import csr_by_row
from moe_train.ops.reference import jitter_reference

pytestmark = pytest.mark.usefixtures("ext")
SEEDS = (0, 1, 2**63 - 1, 987654321987)


@pytest.mark.parametrize("d", [77, 256, 5])
def test_jitter_is_bit_identical_to_the_reference_and_split_invariant(d, gen):
    x = torch.randn(150, d, generator=gen)
    for seed in SEEDS:
        for eps, first in ((0.01, 0), (0.3, 1000), (0.1, 2**40)):
            got = ops.jitter(x, seed, first, eps)
            assert torch.equal(got, jitter_reference(x, seed, first, eps))
            parts = [
                ops.jitter(x[:64], seed, first, eps),
                ops.jitter(x[64:], seed, first + 64, eps),
            ]
            assert torch.equal(torch.cat(parts), got)  # the same noise for a row on any split


def test_jitter_noise_is_uniform_on_its_interval():
    n = ops.jitter(torch.ones(400, 500), seed=9, first_row=0, eps=0.5)  # U[0.5, 1.5)
    assert 0.5 <= float(n.min()) and float(n.max()) < 1.5
    assert abs(float(n.mean()) - 1.0) < 0.005 and abs(float(n.std()) - 12**-0.5) < 0.005
    # neighbouring features and rows are not correlated
    c = torch.corrcoef(torch.stack([n[:, 0], n[:, 1], n.roll(1, 0)[:, 0]]))
    assert c.sub(torch.eye(3)).abs().max() < 0.15


def test_jitter_gradient_is_the_same_noise(gen):
    x = torch.randn(40, 33, generator=gen, requires_grad=True)
    ops.jitter(x, 5, 7, 0.2).backward(torch.ones(40, 33))
    assert torch.equal(x.grad, ops.jitter(torch.ones(40, 33), 5, 7, 0.2))


@pytest.mark.parametrize("shape", [(37, 19, 5), (130, 64, 16), (9, 40, 33)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_gate_matches_jitter_then_linear(shape, eps, bias, gen):
    T, d, E = shape
    x = torch.randn(T, d, generator=gen, requires_grad=True)
    w = torch.randn(E, d, generator=gen, requires_grad=True)
    b = torch.randn(E, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(T, E, generator=gen)
    leaves = [t for t in (x, w, b) if t is not None]
    got = [
        ops.gate(x, w, b, 3, 50, eps),
        *torch.autograd.grad(ops.gate(x, w, b, 3, 50, eps), leaves, g),
    ]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    noise = jitter_reference(torch.ones(T, d), 3, 50, eps).double() if eps else 1.0
    want_y = F.linear(x64 * noise, w64, b64)
    want = [
        want_y,
        *torch.autograd.grad(want_y, [t for t in (x64, w64, b64) if t is not None], g.double()),
    ]
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


def test_gate_rows_do_not_depend_on_the_batch(gen):
    x, w = torch.randn(23, 48, generator=gen), torch.randn(16, 48, generator=gen)
    full = ops.gate(x, w, None, 1, 0, 0.01)
    for lo, hi in ((0, 4), (4, 5), (5, 23)):  # whole blocks of rows, single rows, tails
        assert torch.equal(ops.gate(x[lo:hi], w, None, 1, lo, 0.01), full[lo:hi])


def test_group_by_is_a_stable_sort_with_counts(gen):
    index = torch.randint(0, 7, (500,), generator=gen)
    order, counts = ops.group_by(index, 9)
    assert torch.equal(order, torch.argsort(index, stable=True))
    assert torch.equal(counts, torch.bincount(index, minlength=9))


def test_out_of_range_rows_are_rejected_on_cpu():
    buf, index = torch.randn(3, 8), torch.tensor([0, 5, 1])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.combine(buf, None, index, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moe_train.combine_backward(torch.randn(4, 8), buf, None, index, False)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dispatch(torch.randn(4, 8), index)
    with pytest.raises(RuntimeError, match="out of range"):
        csr_by_row(torch.tensor([0, -1]), 4)


def test_a_tensor_seed_gives_the_int_seeds_bits(gen):
    """Compiled blocks carry seeds as 0-d int64 tensors (ops.hashing.Seed): every hash, the
    jitter gives exactly what the int seed gives (the fused kernel's bits), the gate its function."""
    from moe_train.ops.hashing import counter_uniform, mix_seed, seed_tensor, signed64
    from moe_train.routing import RouteKey
    from moe_train.routing.noise import jitter_seed

    x, w = torch.randn(40, 24, generator=gen), torch.randn(6, 24, generator=gen)
    index = torch.arange(0, 10**6, 997)
    for seed in (*SEEDS, 2**64 - 1):
        t = seed_tensor(seed)
        assert t.dtype == torch.int64 and int(t) == signed64(seed)
        for parts in ((), (3,), (3, 2**63 + 11)):
            assert int(mix_seed(t, *parts)) == mix_seed(seed, *parts)
            assert int(mix_seed(*parts, t)) == mix_seed(*parts, seed)
        assert torch.equal(counter_uniform(t, index), counter_uniform(seed, index))
        js = jitter_seed(seed)
        assert torch.equal(ops.jitter(x, jitter_seed(t), 77, 0.1), ops.jitter(x, js, 77, 0.1))
        # the gate: the same noise, the matmul in torch's order rather than the fused kernel's
        expected = F.linear(ops.jitter(x, js, 5, 0.2), w)
        assert torch.equal(ops.gate(x, w, None, jitter_seed(t), 5, 0.2), expected)
        torch.testing.assert_close(ops.gate(x, w, None, js, 5, 0.2), expected)
        key = RouteKey(seed % 2**63, 1000)
        layered = key.for_compiled_layer(3, torch.device("cpu"))
        assert layered.layered and isinstance(layered.token_offset, torch.Tensor)
        assert int(layered.token_offset) == 1000  # a tensor: no constant to specialise on
        offset = torch.tensor(2**40 + 77)  # a far rank's offset: the same bits as the int
        assert torch.equal(ops.jitter(x, js, offset, 0.1), ops.jitter(x, js, 2**40 + 77, 0.1))
        assert int(layered.seed) == key.for_layer(3).seed  # mixed on the host, then a tensor
        assert layered.for_layer(5) is layered  # a layered key is used as it is

"""The expert bank's backends (moe_train.experts.grouped): the loop, the padded batched matmul and
torch._grouped_mm compute the same function, forward and backward; the choice between them."""

from __future__ import annotations

import pytest
import torch

from moe_train.experts import ExpertBank, grouped
from moe_train.experts.grouped import (
    activate,
    activate_backward,
    grouped_ffn,
    loop_ffn,
    padded_ffn,
    pick_backend,
)

D, H = 16, 24
COUNTS = [5, 0, 11, 3, 0, 7]  # empty experts, sizes that are not multiples of 8
needs_cpu_grouped = pytest.mark.skipif(
    not grouped._grouped_mm_on_cpu(torch.float32), reason="this torch has no CPU _grouped_mm"
)


def weights(activation: str, dtype=torch.float64):
    width = 2 * H if activation == "swiglu" else H
    g = torch.Generator().manual_seed(3)
    w_in = torch.randn(len(COUNTS), D, width, generator=g, dtype=dtype) / 4
    w_out = torch.randn(len(COUNTS), H, D, generator=g, dtype=dtype) / 5
    x = torch.randn(sum(COUNTS), D, generator=g, dtype=dtype)
    return x, w_in, w_out


def per_expert(x, w_in, w_out, activation):
    """The definition: each segment through its own expert."""
    outs = [activate(s @ w_in[e], activation) @ w_out[e] for e, s in enumerate(x.split(COUNTS))]
    return torch.cat(outs)


def value_and_grads(fn, x, w_in, w_out, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_in, w_out)]
    y = fn(*leaves)
    y.backward(grad)
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_loop_equals_the_per_expert_definition_forward_and_backward(activation):
    x, w_in, w_out = weights(activation)
    grad = torch.randn(x.shape[0], D, dtype=x.dtype)
    got = value_and_grads(lambda *t: loop_ffn(*t, COUNTS, activation), x, w_in, w_out, grad)
    want = value_and_grads(lambda *t: per_expert(*t, activation), x, w_in, w_out, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert torch.all(got[2][1] == 0) and torch.all(got[3][4] == 0)  # empty experts: zero grads


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_padded_equals_the_per_expert_definition_forward_and_backward(activation):
    x, w_in, w_out = weights(activation)
    grad = torch.randn(x.shape[0], D, dtype=x.dtype)
    got = value_and_grads(lambda *t: padded_ffn(*t, COUNTS, activation), x, w_in, w_out, grad)
    want = value_and_grads(lambda *t: per_expert(*t, activation), x, w_in, w_out, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert torch.all(got[2][1] == 0) and torch.all(got[3][4] == 0)  # empty experts: zero grads


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_activation_backward_matches_autograd(activation):
    h = torch.randn(7, 2 * H if activation == "swiglu" else H, dtype=torch.float64)
    g = torch.randn(7, H, dtype=torch.float64)
    want = torch.autograd.grad(activate(h.requires_grad_(), activation), h, g)[0]
    torch.testing.assert_close(activate_backward(g, h.detach(), activation), want)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@needs_cpu_grouped
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_equals_loop(activation, dtype):
    x64, w_in64, w_out64 = weights(activation)
    grad64 = torch.randn(x64.shape[0], D, dtype=torch.float64)
    x, w_in, w_out, grad = (t.to(dtype) for t in (x64, w_in64, w_out64, grad64))
    ends = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    got = value_and_grads(lambda *t: grouped_ffn(*t, ends, activation), x, w_in, w_out, grad)
    loop = value_and_grads(lambda *t: loop_ffn(*t, COUNTS, activation), x, w_in, w_out, grad)
    exact = value_and_grads(lambda *t: per_expert(*t, activation), x64, w_in64, w_out64, grad64)
    if dtype == torch.float32:
        for g, w in zip(got, loop):
            torch.testing.assert_close(g, w)
    for g, w, e in zip(got, loop, exact):  # bf16: both within bf16 rounding of the exact value
        assert rel_err(g, e) < 1e-2 and rel_err(w, e) < 1e-2


@pytest.mark.parametrize("backend", ["loop", "grouped", "padded"])
def test_bank_takes_counts_as_a_tensor_or_host_ints(backend):
    if backend == "grouped" and not grouped._grouped_mm_on_cpu(torch.float32):
        pytest.skip("this torch has no CPU _grouped_mm")
    bank = ExpertBank(D, H, num_local=len(COUNTS), init_std=0.3)
    bank.backend = backend
    x = torch.randn(sum(COUNTS), D)
    want = torch.cat([bank.expert_ffn(s, i) for i, s in enumerate(x.split(COUNTS)) if len(s)])
    torch.testing.assert_close(bank(x, COUNTS), want)
    torch.testing.assert_close(bank(x, torch.tensor(COUNTS)), want)


def test_bank_under_autocast_computes_in_the_autocast_dtype():
    bank = ExpertBank(D, H, num_local=len(COUNTS), init_std=0.3)
    x = torch.randn(sum(COUNTS), D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank(x, torch.tensor(COUNTS))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert bank.w_in.grad.dtype == torch.float32 and bank.w_in.grad.abs().sum() > 0
    torch.testing.assert_close(y.float(), bank(x, COUNTS), atol=0.05, rtol=0.05)


def test_backend_choice(monkeypatch):
    x, w_in, w_out = (t.float() for t in weights("gelu"))
    monkeypatch.delenv("MOE_TRAIN_EXPERT_BACKEND", raising=False)
    on_cpu = grouped._grouped_mm_on_cpu(torch.float32)
    segment_ops = grouped._segment_kernels()  # the loop's threads across segments
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert pick_backend(x, w_in, w_out) == ("grouped" if on_cpu and not segment_ops else "loop")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # nothing to place on one thread
    assert pick_backend(x, w_in, w_out) == ("grouped" if on_cpu else "loop")
    monkeypatch.undo()
    monkeypatch.setenv("MOE_TRAIN_SEGMENT_MM", "0")  # without them: torch's C++ loop if it has one
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert pick_backend(x, w_in, w_out) == ("grouped" if on_cpu else "loop")
    monkeypatch.undo()
    assert pick_backend(x, w_in, w_out, "loop") == "loop"
    assert pick_backend(x, w_in, w_out, "padded") == "padded"  # opt-in only
    assert not grouped.grouped_mm_supported(x, w_in, w_out)  # the native kernel is CUDA-only
    monkeypatch.setenv("MOE_TRAIN_EXPERT_BACKEND", "loop")
    assert pick_backend(x, w_in, w_out, "grouped") == "loop"  # the environment wins
    monkeypatch.setenv("MOE_TRAIN_EXPERT_BACKEND", "fast")
    with pytest.raises(ValueError, match="expert backend"):
        pick_backend(x, w_in, w_out)
    monkeypatch.delenv("MOE_TRAIN_EXPERT_BACKEND")
    monkeypatch.setattr(grouped, "_grouped_mm_on_cpu", lambda dtype: False)  # e.g. torch 2.7
    assert pick_backend(x, w_in, w_out) == "loop"
    with pytest.raises(RuntimeError, match="no CPU _grouped_mm"):
        pick_backend(x, w_in, w_out, "grouped")


def test_the_backend_probe_inside_a_checkpointed_forward_saves_nothing_into_it():
    """The first forward probes torch's _grouped_mm (once, cached); under activation checkpointing
    its recomputation does not probe, so the probe must not add to the checkpoint's saved tensors."""
    from torch.utils.checkpoint import checkpoint

    grouped._grouped_mm_on_cpu.cache_clear()
    w_in, w_out = torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    x = torch.randn(10, 8, requires_grad=True)

    def forward(x):
        grouped.pick_backend(x, w_in, w_out)
        return (x * 2).sin()

    checkpoint(forward, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, 2 * (2 * x.detach()).cos())

"""moe_train's Adafactor: the same update as torch.optim.Adafactor on dense parameters, and on a
stacked expert tensor the update of each expert alone (so it does not depend on parallel.ep)."""

from __future__ import annotations

import pytest
import torch

from moe_train.training.adafactor import Adafactor


def _run(params_groups, grads_fn, opt_cls, steps=4, **kw):
    opt = opt_cls(params_groups, lr=0.05, weight_decay=0.1, **kw)
    for t in range(steps):
        for p, g in grads_fn(t):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch < 2.5")
def test_dense_parameters_update_as_torch_adafactor():
    torch.manual_seed(0)
    w0, b0 = torch.randn(6, 5), torch.randn(5)
    grads = [(torch.randn(6, 5), torch.randn(5)) for _ in range(4)]
    ours = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    ref = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    _run([{"params": ours}], lambda t: zip(ours, grads[t]), Adafactor)
    _run([{"params": ref}], lambda t: zip(ref, grads[t]), torch.optim.Adafactor, foreach=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stacked_experts_update_each_expert_as_if_alone():
    torch.manual_seed(1)
    w0 = torch.randn(4, 6, 5)
    w0[0] *= 10  # experts of very different scales: a shared RMS would change the others' steps
    grads = [torch.randn(4, 6, 5) for _ in range(4)]
    stacked = torch.nn.Parameter(w0.clone())
    _run([{"params": [stacked], "moe": True}], lambda t: [(stacked, grads[t])], Adafactor)
    for e in range(4):
        alone = torch.nn.Parameter(w0[e].clone())
        _run([{"params": [alone]}], lambda t, e=e, a=alone: [(a, grads[t][e])], Adafactor)
        torch.testing.assert_close(stacked[e], alone, rtol=1e-6, atol=1e-7)


def test_state_is_factored():
    p = torch.nn.Parameter(torch.randn(3, 8, 16))
    opt = _run([{"params": [p], "moe": True}], lambda t: [(p, torch.randn(3, 8, 16))], Adafactor, 1)
    state = opt.state[p]
    assert state["row_var"].shape == (3, 8, 1) and state["col_var"].shape == (3, 1, 16)

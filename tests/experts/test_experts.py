"""The expert bank: layout-invariant init, segment forward, empty experts."""

from __future__ import annotations

import pytest
import torch

from moe_train.experts import ExpertBank

D, H = 8, 12


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_same_global_expert_same_weights_whatever_the_layout(activation):
    full = ExpertBank(D, H, num_local=8, first_expert=0, activation=activation, seed=3, layer_id=2)
    half = ExpertBank(D, H, num_local=4, first_expert=4, activation=activation, seed=3, layer_id=2)
    assert torch.equal(full.w_in[4:], half.w_in)
    assert torch.equal(full.w_out[4:], half.w_out)
    # and the init really depends on the expert id, the seed and the layer
    assert not torch.equal(full.w_in[0], full.w_in[1])
    other_seed = ExpertBank(D, H, num_local=8, activation=activation, seed=4, layer_id=2)
    other_layer = ExpertBank(D, H, num_local=8, activation=activation, seed=3, layer_id=3)
    assert not torch.equal(full.w_in, other_seed.w_in)
    assert not torch.equal(full.w_in, other_layer.w_in)
    width = 2 * H if activation == "swiglu" else H
    assert full.w_in.shape == (8, D, width) and full.w_out.shape == (8, H, D)


def test_init_ignores_the_global_rng():
    torch.manual_seed(1)
    a = ExpertBank(D, H, num_local=2)
    torch.manual_seed(2)
    b = ExpertBank(D, H, num_local=2)
    assert torch.equal(a.w_in, b.w_in)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_forward_runs_each_segment_through_its_expert(activation):
    bank = ExpertBank(D, H, num_local=4, activation=activation, init_std=0.3)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), D)
    y = bank(x, counts)
    want = torch.cat([bank.expert_ffn(s, i) for i, s in enumerate(x.split(counts)) if len(s)])
    torch.testing.assert_close(y, want)
    # expert_ffn by hand
    w_in, w_out = bank.w_in[2], bank.w_out[2]
    h = x[3:8] @ w_in
    if activation == "swiglu":
        g, u = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
    else:
        h = torch.nn.functional.gelu(h, approximate="tanh")
    torch.testing.assert_close(y[3:8], h @ w_out)


def test_empty_expert_forward_backward_zero_grad_slice():
    bank = ExpertBank(D, H, num_local=3, init_std=0.3)
    counts = [4, 0, 2]
    x = torch.randn(6, D, requires_grad=True)
    bank(x, counts).square().sum().backward()
    assert torch.all(bank.w_in.grad[1] == 0) and torch.all(bank.w_out.grad[1] == 0)
    assert bank.w_in.grad[0].abs().sum() > 0 and bank.w_out.grad[2].abs().sum() > 0


def test_no_rows_at_all():
    bank = ExpertBank(D, H, num_local=2)
    x = torch.zeros(0, D, requires_grad=True)
    y = bank(x, [0, 0])
    assert y.shape == (0, D)
    y.sum().backward()
    assert bank.w_in.grad is not None and torch.all(bank.w_in.grad == 0)
    # the gradient reaches the input too: FSDP reduce-scatters a bank when it does
    # (tests/parallel/test_fsdp_empty_experts.py)
    assert x.grad is not None and x.grad.shape == (0, D)


def test_bad_counts_and_activation_raise():
    bank = ExpertBank(D, H, num_local=2)
    with pytest.raises(ValueError):
        bank(torch.randn(3, D), [1, 1])
    with pytest.raises(ValueError):
        bank(torch.randn(3, D), [3])
    with pytest.raises(ValueError, match="activation"):
        ExpertBank(D, H, num_local=2, activation="relu")

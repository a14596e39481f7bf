"""The expert bank: its init rule, segment forward, empty experts."""

from __future__ import annotations

import pytest
import torch

from moe_train.experts import ExpertBank

D, H = 8, 12


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_rule_is_one_experts_clamped_normal_slice(activation):
    """init_value is the bank's rule (moe_train.init keys it per global expert, as
    tests/model/test_init.py checks): one expert's slice, std init_std for w_in and out_std for
    w_out, clamped to +-3 std."""
    bank = ExpertBank(D, H, num_local=2, activation=activation, init_std=0.5, out_std=0.05)
    width = 2 * H if activation == "swiglu" else H
    assert bank.w_in.shape == (2, D, width) and bank.w_out.shape == (2, H, D)
    big = torch.Size([400, 500])
    for name, std in (("w_in", 0.5), ("w_out", 0.05)):
        value = bank.init_value(name, big, torch.Generator().manual_seed(0))
        assert value.abs().max() <= 3 * std  # clamped
        assert (value.abs() == 3 * std).sum() > 0  # and the clamp really cut the tails
        assert abs(float(value.std()) - std) < 0.02 * std
    same = bank.init_value("w_in", bank.w_in.shape[1:], torch.Generator().manual_seed(1))
    again = bank.init_value("w_in", bank.w_in.shape[1:], torch.Generator().manual_seed(1))
    assert torch.equal(same, again)  # a function of the generator alone


def test_a_bank_built_alone_draws_from_the_global_rng_and_on_meta_draws_nothing():
    torch.manual_seed(0)
    a = ExpertBank(D, H, num_local=3, init_std=0.3)
    torch.manual_seed(0)
    b = ExpertBank(D, H, num_local=3, init_std=0.3)
    assert torch.equal(a.w_in, b.w_in) and torch.equal(a.w_out, b.w_out)
    assert not torch.equal(a.w_in[0], a.w_in[1])  # each expert its own draw
    state = torch.get_rng_state()
    with torch.device("meta"):  # inside a model or layer: moe_train.init draws it later
        ExpertBank(D, H, num_local=3)
    assert torch.equal(state, torch.get_rng_state())


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

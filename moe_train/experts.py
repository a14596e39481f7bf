"""The expert bank: stacked weights of the local experts, run on contiguous segments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .parallel.placement import mark_expert
from .routing.noise import mix_seed

ACTIVATIONS = ("gelu", "swiglu")


def activate(h: Tensor, activation: str) -> Tensor:
    """The FFN's nonlinearity: GELU (tanh) on h [.., h], or SwiGLU silu(gate) * up on the two
    halves of h [.., 2h] -> [.., h]. Shared by the experts and the dense FFN."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


class ExpertBank(nn.Module):
    """E_local feed-forward experts with stacked weights.

    w_in:  [E_local, d, h]   (swiglu: [E_local, d, 2h], gate and up halves)
    w_out: [E_local, h, d]
    Expert `first_expert + i` is initialised from a generator seeded by (seed, layer_id, global id),
    so the same experts come out whatever the parallel layout.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_local: int,
        first_expert: int = 0,
        activation: str = "gelu",
        seed: int = 0,
        layer_id: int = 0,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: got {activation!r}; allowed: gelu, swiglu")
        self.d_model, self.d_ff, self.num_local = d_model, d_ff, num_local
        self.first_expert, self.activation = first_expert, activation
        self.seed, self.layer_id = seed, layer_id
        self.init_std = init_std
        self.out_std = out_std if out_std is not None else init_std
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = mark_expert(nn.Parameter(torch.empty(num_local, d_model, width)))
        self.w_out = mark_expert(nn.Parameter(torch.empty(num_local, d_ff, d_model)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.w_in.is_meta:  # shape-only model (the planner): nothing to initialise
            return
        for i in range(self.num_local):
            g = torch.Generator().manual_seed(
                mix_seed(self.seed, self.layer_id, self.first_expert + i)
            )
            w_in = torch.randn(self.w_in.shape[1:], generator=g) * self.init_std
            w_out = torch.randn(self.w_out.shape[1:], generator=g) * self.out_std
            self.w_in[i].copy_(w_in.clamp_(-3 * self.init_std, 3 * self.init_std))
            self.w_out[i].copy_(w_out.clamp_(-3 * self.out_std, 3 * self.out_std))

    def ffn(self, x: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        """One expert's FFN on its rows x: [n, d] with w_in [d, h|2h], w_out [h, d] -> [n, d]."""
        return activate(x @ w_in.to(x.dtype), self.activation) @ w_out.to(x.dtype)

    def expert_ffn(self, x: Tensor, i: int) -> Tensor:
        """Local expert i on its rows x: [n, d] -> [n, d]."""
        return self.ffn(x, self.w_in[i], self.w_out[i])

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """x: [S, d] rows sorted by local expert; counts: rows per local expert -> [S, d]."""
        if len(counts) != self.num_local or sum(counts) != x.shape[0]:
            raise ValueError(
                f"expert counts {counts} do not match {self.num_local} experts / {x.shape[0]} rows"
            )
        # unbind once: its backward stacks the expert grads in one pass (indexing w[i] per expert
        # would zero-fill a full-size gradient for every expert)
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        outs = [
            self.ffn(seg, w_in[i], w_out[i])
            for i, seg in enumerate(x.split(counts))
            if seg.shape[0] > 0
        ]
        if not outs:  # no rows: stay in the graph so every expert param still gets a zero gradient
            return x.new_zeros(x.shape) + (self.w_in.sum() + self.w_out.sum()).to(x.dtype) * 0
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def flops_per_row(self) -> int:
        width = self.w_in.shape[2]
        return 2 * self.d_model * width + 2 * self.d_ff * self.d_model


def dense_ffn_params(d_model: int, d_ff: int, activation: str) -> int:
    return d_model * d_ff * (3 if activation == "swiglu" else 2)

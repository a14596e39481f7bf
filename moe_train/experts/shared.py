"""Shared experts (DeepSeekMoE, Qwen2-MoE): always-on FFNs every token of an MoE layer runs.

Dense parameters (data-parallel, FSDP-sharded with the other dense ones; never expert-parallel):
they run on the rank's own tokens, no all-to-all. `count` shared experts of width `d_ff` are one
FFN of hidden width count * d_ff (the sum of their outputs, as DeepSeek-V3 builds them). With
`gate`, the output is scaled per token by sigmoid(x . w_gate) (Qwen2-MoE's shared_expert_gate).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .grouped import activate


class SharedExperts(nn.Module):
    """x [N, d] -> [N, d]: w_out(act(w_in x)) [* sigmoid(w_gate x)].

    w_in:   [H | 2H, d] (swiglu: gate rows, then up rows; H = count * d_ff)
    w_out:  [d, H]
    w_gate: [1, d] (when gated)
    Init rule (`init_value`): normal(0, init_std); w_out normal(0, out_std).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        count: int,
        activation: str,
        gate: bool = False,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        self.activation = activation
        self.hidden = count * d_ff
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        width = 2 * self.hidden if activation == "swiglu" else self.hidden
        self.w_in = nn.Parameter(torch.empty(width, d_model))
        self.w_out = nn.Parameter(torch.empty(d_model, self.hidden))
        self.w_gate = nn.Parameter(torch.empty(1, d_model)) if gate else None
        self.reset_parameters()

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        std = self.out_std if name == "w_out" else self.init_std
        return torch.randn(shape, generator=generator) * std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if not p.is_meta:
                p.copy_(self.init_value(name, p.shape))

    def forward(self, x: Tensor) -> Tensor:
        h = activate(x @ self.w_in.to(x.dtype).t(), self.activation)  # [N, H]
        y = h @ self.w_out.to(x.dtype).t()  # [N, d]
        if self.w_gate is not None:
            y = y * torch.sigmoid(x @ self.w_gate.to(x.dtype).t())  # [N, 1] per-token gate
        return y


def shared_expert_params(d_model: int, d_ff: int, count: int, activation: str, gate: bool) -> int:
    """Parameters of `count` shared experts of width d_ff (and the gate's d)."""
    hidden = count * d_ff
    width = 2 * hidden if activation == "swiglu" else hidden
    return d_model * (width + hidden) + (d_model if gate else 0)

"""The expert bank: stacked weights of the local experts, run on contiguous segments."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..parallel.placement import mark_expert
from .grouped import activate, grouped_ffn, loop_ffn, loop_ffn_op, padded_ffn, pick_backend

ACTIVATIONS = ("gelu", "swiglu")

__all__ = ["ACTIVATIONS", "ExpertBank", "activate", "dense_ffn_params"]


class ExpertBank(nn.Module):
    """E_local feed-forward experts with stacked weights.

    w_in:  [E_local, d, h]   (swiglu: [E_local, d, 2h], gate and up halves)
    w_out: [E_local, h, d]
    Init rule (`init_value`): one expert's slice is normal(0, std) clamped to +-3 std, std =
    init_std for w_in and out_std for w_out. Inside an MoE layer moe_train.init draws every expert
    from a generator keyed by its GLOBAL id, so the same experts come out whatever the layout; a
    bank built alone (`reset_parameters`) draws from the global RNG.
    `backend`: "auto" (grouped GEMM where torch runs it natively, else the loop), "grouped",
    "loop" or "padded" (moe_train.experts.grouped); set it on an instance to force one.
    """

    backend: str = "auto"

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_local: int,
        first_expert: int = 0,
        activation: str = "gelu",
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation: got {activation!r}; allowed: {', '.join(ACTIVATIONS)}"
            )
        self.d_model, self.d_ff, self.num_local = d_model, d_ff, num_local
        self.first_expert, self.activation = first_expert, activation
        self.init_std = init_std
        self.out_std = out_std if out_std is not None else init_std
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = mark_expert(nn.Parameter(torch.empty(num_local, d_model, width)))
        self.w_out = mark_expert(nn.Parameter(torch.empty(num_local, d_ff, d_model)))
        self.reset_parameters()

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        """One expert's initial slice of `name` (w_in [d, h|2h] or w_out [h, d]), drawn from
        `generator`: normal(0, std) clamped to +-3 std."""
        std = self.out_std if name == "w_out" else self.init_std
        return (torch.randn(shape, generator=generator) * std).clamp_(-3 * std, 3 * std)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Every local expert by `init_value`, from `generator` (default: the global RNG). Nothing
        on meta (a bank inside a model or layer: moe_train.init draws it, keyed per expert)."""
        if self.w_in.is_meta:
            return
        for name, p in self.named_parameters():
            for i in range(self.num_local):
                p[i].copy_(self.init_value(name, p.shape[1:], generator))

    def ffn(self, x: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
        """One expert's FFN on its rows x: [n, d] with w_in [d, h|2h], w_out [h, d] -> [n, d]."""
        return activate(x @ w_in.to(x.dtype), self.activation) @ w_out.to(x.dtype)

    def expert_ffn(self, x: Tensor, i: int) -> Tensor:
        """Local expert i on its rows x: [n, d] -> [n, d]."""
        return self.ffn(x, self.w_in[i], self.w_out[i])

    def forward(self, x: Tensor, counts: Tensor | list[int]) -> Tensor:
        """x: [S, d] rows sorted by local expert; counts: rows per local expert ([E_local] int
        tensor on any device, or host ints) -> [S, d] in the compute dtype (the autocast dtype
        when autocast is on, else x's).

        The grouped backend (see moe_train.grouped) reads the counts on the device and never
        syncs; the loop backend needs them on the host."""
        self._check_counts(x, counts)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        w_in, w_out = self.w_in.to(x.dtype), self.w_out.to(x.dtype)
        if torch.compiler.is_compiling():  # no branch on the (data-dependent) row count
            with torch.autocast(dev, enabled=False):
                return self._traced(x, w_in, w_out, counts)
        if x.shape[0] == 0:
            # Stay in the graph of the weights (each gets a zero gradient) AND of x: FSDP runs a
            # bank's reduce-scatter when the gradient reaches its input; an output cut off from
            # x would delay it to the end of backward on this rank only, out of order with the
            # other ranks' collectives (a hang).
            return x * 0 + (w_in.sum() + w_out.sum()) * 0
        with torch.autocast(dev, enabled=False):
            backend = pick_backend(x, w_in, w_out, self.backend)
            if backend == "grouped":
                if not isinstance(counts, Tensor):
                    counts = torch.tensor(counts)
                ends = counts.to(x.device).cumsum(0, dtype=torch.int32)  # [E_local]
                return grouped_ffn(x, w_in, w_out, ends, self.activation)
            host = counts.tolist() if isinstance(counts, Tensor) else list(counts)
            if sum(host) != x.shape[0]:
                raise ValueError(f"expert counts {host} do not add up to the {x.shape[0]} rows")
            ffn = padded_ffn if backend == "padded" else loop_ffn
            return ffn(x, w_in, w_out, host, self.activation)

    def _traced(self, x: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor | list[int]) -> Tensor:
        """Under torch.compile: the grouped GEMM where its fake kernel traces (CUDA bfloat16),
        else the loop backend as one opaque op (loop_ffn_op): no graph break either way."""
        if not isinstance(counts, Tensor):
            counts = torch.tensor(counts)
        if x.device.type == "cuda" and x.dtype == torch.bfloat16 and self.backend != "loop":
            ends = counts.to(x.device).cumsum(0, dtype=torch.int32)
            return grouped_ffn(x, w_in, w_out, ends, self.activation)
        return loop_ffn_op(x, w_in, w_out, counts, self.activation)

    def _check_counts(self, x: Tensor, counts: Tensor | list[int]) -> None:
        """One count per local expert; host counts must add up to the rows (no sync for a
        tensor: its sum is checked where it is read on the host)."""
        n = counts.shape[0] if isinstance(counts, Tensor) else len(counts)
        if n != self.num_local or (not isinstance(counts, Tensor) and sum(counts) != x.shape[0]):
            raise ValueError(
                f"expert counts {list(counts)} do not match {self.num_local} experts / "
                f"{x.shape[0]} rows"
            )

    def flops_per_row(self) -> int:
        width = self.w_in.shape[2]
        return 2 * self.d_model * width + 2 * self.d_ff * self.d_model


def dense_ffn_params(d_model: int, d_ff: int, activation: str) -> int:
    return d_model * d_ff * (3 if activation == "swiglu" else 2)

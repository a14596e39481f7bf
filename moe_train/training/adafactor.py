"""Adafactor (Shazeer & Stern 2018, arXiv 1804.04235) with factored second moments, as
torch.optim.Adafactor computes it, except that a stacked expert weight [E_local, d, h] is E_local
independent matrices.

Why not torch.optim.Adafactor itself: its relative step size scales by the RMS of the WHOLE
parameter (`alpha = max(eps2, RMS(p)) * rho`) and clips by the RMS of the whole update; over a
stacked expert tensor that RMS mixes the E_local experts of this rank, so the update would depend
on parallel.ep. Here those two RMS are taken per expert (parameter groups with `moe: True`), and
the row/column statistics are per expert already (they reduce the last two dims).

Per matrix W [r, c] (per expert, or a dense weight), step t, lr the schedule's learning rate:
    beta2_t = 1 - t^beta2_decay;  rho = min(lr, 1/sqrt(t));  alpha = max(eps2, RMS(W)) * rho
    R <- beta2_t R + (1 - beta2_t) mean_c(g^2)   [r, 1]      C <- ... mean_r(g^2)   [1, c]
    V = R C / mean_r(R);  U = g / sqrt(max(V, eps1^2));  W <- W (1 - lr wd) - alpha U / max(1, RMS(U)/d)
Vectors (norms, biases) keep an unfactored V. Works on DTensor shards (FSDP): the reductions over
a sharded dimension are DTensor reductions, so the statistics are global.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _mean(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean over `dims` (kept) as a sum divided by the count: over a sharded DTensor dim a mean
    becomes an AVG all-reduce, which gloo does not have in torch 2.7; a sum is a SUM."""
    count = 1
    for d in dims:
        count *= t.shape[d]
    return t.sum(dim=dims, keepdim=True) / count


def _rms(t: Tensor, per_expert: bool) -> Tensor:
    """RMS over the whole tensor, or per leading index ([E, 1, 1]) for stacked experts."""
    dims = tuple(range(1 if per_expert else 0, t.dim()))
    return _mean(t.pow(2), dims).sqrt()


class Adafactor(torch.optim.Optimizer):
    """Factored Adafactor; parameter groups with `moe: True` hold stacked expert weights."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or beta2_decay > 0 or d < 1 or weight_decay < 0:
            raise ValueError("Adafactor: lr >= 0, beta2_decay <= 0, d >= 1, weight_decay >= 0")
        defaults = {"lr": lr, "beta2_decay": beta2_decay, "eps": eps, "d": d}
        super().__init__(params, {**defaults, "weight_decay": weight_decay, "moe": False})

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if p.dim() > 1:
                state["row_var"] = p.new_zeros((*p.shape[:-1], 1))  # [.., r, 1]
                state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))  # [.., 1, c]
            else:
                state["variance"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self._state(p), group)
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict) -> None:
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
        lr, per_expert = group["lr"], bool(group["moe"]) and p.dim() > 2
        state["step"] += 1
        t = float(state["step"])
        one_minus_beta2 = t ** group["beta2_decay"]
        alpha = _rms(p, per_expert).clamp(min=eps2) * min(lr, 1 / t**0.5)
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        g2 = grad * grad
        if p.dim() > 1:
            row, col = state["row_var"], state["col_var"]
            row.lerp_(_mean(g2, (-1,)), one_minus_beta2)
            col.lerp_(_mean(g2, (-2,)), one_minus_beta2)
            var = (row @ col) / _mean(row, (-2,)).clamp(min=eps1)
        else:
            state["variance"].lerp_(g2, one_minus_beta2)
            var = state["variance"]
        update = grad * var.clamp(min=eps1 * eps1).rsqrt()
        denom = (_rms(update, per_expert) / group["d"]).clamp(min=1.0)
        p.sub_(update * (alpha / denom))

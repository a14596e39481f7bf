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
Vectors (norms, biases) keep an unfactored V. Works on FSDP's DTensor shards: the math runs on the
local shards, and every mean over the sharded dimension is summed over the shard group
explicitly (not left to DTensor, whose reductions over uneven or size-1 shards differ between
torch versions), so the statistics are global. The state tensors are DTensors (rows sharded like
the parameter, columns replicated) so checkpoints reshard them like the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class _Shards:
    """How one parameter is split (None: a plain tensor): its shard dim and the group over which
    reductions across that dim are summed (a DTensor on a 1-D mesh, Shard(k), as FSDP makes)."""

    def __init__(self, p: Tensor):
        from torch.distributed.tensor import DTensor, Shard

        self.dim: int | None = None
        self.group = None
        if isinstance(p, DTensor):
            for placement in p.placements:
                if isinstance(placement, Shard):
                    self.dim, self.group = placement.dim, p.device_mesh.get_group()

    def mean(self, t: Tensor, dims: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
        """Mean over `dims` (kept) of the local `t`, whole across shards; `shape` is global."""
        dims = tuple(d % len(shape) for d in dims)
        out = t.sum(dim=dims, keepdim=True)
        if self.dim is not None and self.dim in dims:
            import torch.distributed as dist

            dist.all_reduce(out, group=self.group)
        return out / math.prod(shape[d] for d in dims)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rms(t: Tensor, shape: tuple[int, ...], shards: _Shards, per_expert: bool) -> Tensor:
    """RMS of local `t` over the whole tensor, or per leading index ([E, 1, 1]) for experts."""
    dims = tuple(range(1 if per_expert else 0, len(shape)))
    return shards.mean(t.pow(2), dims, shape).sqrt()


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
        """step, and row_var [.., r, 1] + col_var [.., 1, c] (or variance for vectors); for a
        DTensor parameter sharded on a row dim: rows sharded like it, columns replicated."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if p.dim() > 1:
                state["row_var"] = _zeros_like_stat(p, -1)
                state["col_var"] = _zeros_like_stat(p, -2)
            else:
                state["variance"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        state, shards, shape = self._state(p), _Shards(p), tuple(p.shape)
        assert p.grad is not None  # step() updates the parameters that have a gradient
        w, grad = _local(p), _local(p.grad)
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
        lr, per_expert = group["lr"], bool(group["moe"]) and p.dim() > 2
        state["step"] += 1
        t = float(state["step"])
        one_minus_beta2 = t ** group["beta2_decay"]
        alpha = _rms(w, shape, shards, per_expert).clamp(min=eps2) * min(lr, 1 / t**0.5)
        if group["weight_decay"]:
            w.mul_(1 - lr * group["weight_decay"])
        g2 = grad * grad
        if p.dim() > 1:
            row, col = _local(state["row_var"]), _local(state["col_var"])
            row.lerp_(shards.mean(g2, (-1,), shape), one_minus_beta2)
            col.lerp_(shards.mean(g2, (-2,), shape), one_minus_beta2)
            row_mean = shards.mean(row, (-2,), (*shape[:-1], 1))
            var = (row @ col) / row_mean.clamp(min=eps1)
        else:
            variance = _local(state["variance"])
            variance.lerp_(g2, one_minus_beta2)
            var = variance
        update = grad * var.clamp(min=eps1 * eps1).rsqrt()
        denom = (_rms(update, shape, shards, per_expert) / group["d"]).clamp(min=1.0)
        w.sub_(update * (alpha / denom))


def _zeros_like_stat(p: Tensor, reduced: int) -> Tensor:
    """Zeros shaped like p with dim `reduced` of size 1: a row (-1) or column (-2) statistic.
    For a DTensor: sharded like p unless p is sharded on the reduced dim (then replicated)."""
    shape = list(p.shape)
    shape[reduced] = 1
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return p.new_zeros(shape)
    reduced %= p.dim()
    placements = [
        Replicate() if isinstance(pl, Shard) and pl.dim == reduced else pl for pl in p.placements
    ]
    local_shape = list(p.to_local().shape)
    for pl in placements:
        if isinstance(pl, Shard):
            local_shape[reduced] = 1
            break
    else:
        local_shape = shape
    local = torch.zeros(local_shape, dtype=p.dtype, device=p.to_local().device)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )

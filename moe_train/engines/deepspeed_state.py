"""ZeRO 1/2 state as whole tensors per parameter, for moe-train's DCP checkpoints.

DeepSpeed's ZeRO stage 1/2 optimizer (`DeepSpeedZeroOptimizer`) keeps, per parameter group i,
the fp32 master weights and the optimizer state as flat partitions (`param_groups[i]["params"]
== [flat]` of the client optimizer), each rank a slice: dense groups sliced over the world,
expert groups over their expert-data-parallel group. Each module parameter `p` (the low-precision
copy, whole on every rank) carries `p._hp_mapping`: which elements of `p` (lp_fragment_address)
sit where in this rank's flat partition (hp_fragment_address), or None when none do.

`gather` builds whole fp32 tensors per parameter (master weight, exp_avg, ...) by summing each
rank's fragment over the group that shares the parameter, so moe_train.checkpoint saves them in
its own format (the same keys as the native engine: a DeepSpeed checkpoint resumes on the native
engine at any ep, and the other way round). `scatter` writes whole tensors back into this rank's
fragments. Both are collective. The whole tensors are transient (one copy of the full state while
saving or loading: the price of a layout-free format).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import init_optimizer_state
from ..parallel import ParallelState, is_expert_param
from ..parallel.errors import guarded


def _group_of(p: nn.Parameter, parallel: ParallelState) -> dist.ProcessGroup | None:
    """The ranks that share p's ZeRO partition: its expert dp group, or the world (None)."""
    return parallel.groups.dp if is_expert_param(p) else None


def _whole(p: nn.Parameter, flat: Tensor, parallel: ParallelState) -> Tensor:
    """The whole fp32 tensor shaped like p whose elements this rank holds at p's fragment of
    `flat` (a flat partition: the master weights or one optimizer state), summed over p's group."""
    out = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        out.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
    if parallel.dims.distributed:
        group = _group_of(p, parallel)
        guarded("all_reduce(ZeRO state)", lambda: dist.all_reduce(out, group=group))
    return out.view(p.shape)


def _write(p: nn.Parameter, flat: Tensor, whole: Tensor) -> None:
    """This rank's fragment of p in `flat` <- the matching elements of `whole` (shaped like p)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat.narrow(0, hp.start, hp.numel).copy_(whole.reshape(-1).narrow(0, lp.start, lp.numel))


def zero_groups(zero: Any) -> list[list[nn.Parameter]]:
    """The module parameters of each of ZeRO's parameter groups (the client's groups, in order)."""
    return [list(group) for group in zero.bit16_groups]


class WholeState:
    """An optimizer-shaped view (`param_groups`, `state`) of a ZeRO 1/2 optimizer with whole
    tensors per module parameter, as moe_train.checkpoint reads and fills it."""

    def __init__(self, zero: Any, parallel: ParallelState):
        self.zero, self.parallel = zero, parallel
        self.inner = zero.optimizer  # the client optimizer, over the flat partitions
        self.groups = zero_groups(zero)
        self.param_groups = [
            {**{k: v for k, v in g.items() if k not in ("params", "name")}, "params": ps}
            for g, ps in zip(self.inner.param_groups, self.groups)
        ]
        self.state: dict[nn.Parameter, dict[str, Any]] = {}

    def _flat(self, gi: int) -> Tensor:
        return self.inner.param_groups[gi]["params"][0]

    def _keys(self, gi: int) -> list[str]:
        """The per-element state keys of group gi (exp_avg, exp_avg_sq, ...), in order."""
        flat = self._flat(gi)
        state = self.inner.state.get(flat, {})
        return [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == flat.shape]

    def gather(self) -> None:
        """state[p] <- whole tensors of every per-element state and the group's step (collective)."""
        self.state = {}
        for gi, params in enumerate(self.groups):
            flat_state = self.inner.state.get(self._flat(gi), {})
            step = flat_state.get("step")
            for p in params:
                entry: dict[str, Any] = {}
                if step is not None:
                    entry["step"] = step.detach().clone() if isinstance(step, Tensor) else step
                for key in self._keys(gi):
                    entry[key] = _whole(p, flat_state[key], self.parallel)
                if entry:
                    self.state[p] = entry

    def allocate(self) -> None:
        """Create the inner state (a step at learning rate 0 on zero gradients) and whole tensors
        for it, to be filled by a load and written back with `scatter`."""
        init_optimizer_state(self.inner)
        self.gather()

    def scatter(self) -> None:
        """This rank's fragments of the inner state <- state[p]; the step of each group."""
        for gi, params in enumerate(self.groups):
            flat_state = self.inner.state.get(self._flat(gi), {})
            for p in params:
                entry = self.state.get(p, {})
                for key in self._keys(gi):
                    if key in entry:
                        _write(p, flat_state[key], entry[key])
                if "step" in entry and "step" in flat_state:
                    step = entry["step"]
                    if isinstance(flat_state["step"], Tensor):
                        flat_state["step"].copy_(torch.as_tensor(step))
                    else:
                        flat_state["step"] = step


@contextmanager
def whole_master_weights(zero: Any, parallel: ParallelState, load: bool) -> Iterator[None]:
    """Inside: every module parameter holds its whole fp32 master weight (gathered from ZeRO's
    partitions). On exit with load=True the (loaded) values go back into ZeRO's master partitions
    and the module's own copies; the module's parameters get their own tensors back either way."""
    swapped: list[tuple[int, nn.Parameter, Tensor]] = []
    for gi, params in enumerate(zero_groups(zero)):
        flat = zero.optimizer.param_groups[gi]["params"][0]
        for p in params:
            swapped.append((gi, p, p.data))
            p.data = _whole(p, flat, parallel)
    try:
        yield
    finally:
        with torch.no_grad():
            for gi, p, own in swapped:
                if load:
                    _write(p, zero.optimizer.param_groups[gi]["params"][0], p.data)
                    own.copy_(p.data)
                p.data = own


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def zero_state_bytes(zero: Any) -> dict[str, int]:
    """This rank's state under ZeRO 1/2, from ZeRO's own tensors: params = the module's whole
    low-precision copy (its flat buffers) + this rank's fp32 master partitions; grads = the fp32
    partition the step reduces into (stage 2) or the whole low-precision gradients (stage 1);
    optimizer = every tensor of the client optimizer's state (over the partitions)."""
    masters = list(zero.single_partition_of_fp32_groups)
    lp = _nbytes(list(zero.bit16_groups_flat))
    grads = _nbytes(masters) if zero.partition_gradients else lp
    seen: set[int] = set()
    optim = 0
    for state in zero.optimizer.state.values():
        for v in state.values():
            if isinstance(v, Tensor) and id(v) not in seen:
                seen.add(id(v))
                optim += v.numel() * v.element_size()
    out = {"params": lp + _nbytes(masters), "grads": grads, "optimizer": optim}
    return {**out, "total": sum(out.values())}

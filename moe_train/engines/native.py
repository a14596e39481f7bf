"""moe-train's own engine: the run's GradSync (flat, DDP or FSDP), fp16 loss scaling, the step."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..checkpoint import (
    PendingCheckpoint,
    load_latest_checkpoint,
    save_checkpoint,
    save_checkpoint_async,
)
from ..parallel import GradSync, ParallelState
from ..parallel.grads import agree_on_overflow
from ..parallel.memory import state_bytes

if TYPE_CHECKING:
    from ..model import MoETransformer


class NativeEngine:
    """The update with the gradient strategy `parallelize` chose (`grad_sync`: flat, DDP or FSDP)
    and the collectives of `parallel` (a ParallelState).

    micro_batch: grad_sync.no_sync(last) (DDP and FSDP reduce on the last micro-batch only).
    backward: loss / grad_accum, scaled by the GradScaler when computing in fp16.
    step: grad_sync.sync() (dense over the world, experts over their dp group), unscale (fp16: the
    overflow flag is MAX-reduced over the world, so every rank skips together and keeps the same
    scale), clip to the global norm, apply only when that norm is finite (else the step is
    skipped), zero the grads.
    Checkpoints: DCP, reshardable across expert-parallel sizes (moe_train.checkpoint).
    """

    def __init__(
        self,
        grad_sync: GradSync,
        optimizer: torch.optim.Optimizer,
        parallel: ParallelState,
        *,
        grad_accum: int,
        grad_clip: float,
        amp_dtype: torch.dtype | None,
        async_checkpoint: bool = False,
    ):
        self.grad_sync, self.optimizer, self.parallel = grad_sync, optimizer, parallel
        self.model: nn.Module = grad_sync.model  # the forward pass (the DDP wrapper with DDP)
        # the bare model (parallelize was given an MoETransformer): optimizer, checkpoints
        self.module = cast("MoETransformer", grad_sync.module)
        self.grad_accum, self.grad_clip, self.amp_dtype = grad_accum, grad_clip, amp_dtype
        device_type = parallel.device.type
        self.scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
        self._grad_norm: Tensor = torch.zeros(())  # [] of the last step, before clipping
        self._state_bytes: int | None = None
        self.async_checkpoint = async_checkpoint  # DCP async_save (distributed runs only)
        self._pending: PendingCheckpoint | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.parallel.device.type, dtype=self.amp_dtype)

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return self.grad_sync.no_sync(last)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self) -> bool:
        self.grad_sync.sync()
        self.scaler.unscale_(self.optimizer)
        if self.scaler.is_enabled():  # one overflow decision, one loss scale, on every rank
            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            agree_on_overflow(list(state["found_inf_per_device"].values()))
        self._grad_norm = self.grad_sync.clip(self.grad_clip)
        applied = bool(torch.isfinite(self._grad_norm))
        if applied:  # a non-finite loss or gradient is never applied
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self._state_bytes = state_bytes(self.module, self.optimizer)["total"]  # grads still here
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def state_bytes(self) -> int | None:
        """This rank's parameter + gradient + optimizer-state bytes at the last step (local)."""
        return self._state_bytes

    def grad_norm(self) -> float:
        return float(self._grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def save_checkpoint(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        self.finish_checkpoint()  # one save in flight at a time
        args = (run_dir, step, self.module, self.optimizer, extra, self.parallel)
        if self.async_checkpoint and self.parallel.dims.distributed:
            self._pending = save_checkpoint_async(*args, keep=keep)
        else:
            save_checkpoint(*args, keep=keep)

    def finish_checkpoint(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def load_latest(self, run_dir: Path) -> dict[str, Any] | None:
        """The newest checkpoint that verifies (damaged ones are reported and moved aside)."""
        self.finish_checkpoint()
        found = load_latest_checkpoint(run_dir, self.module, self.optimizer, self.parallel)
        return None if found is None else found[1]

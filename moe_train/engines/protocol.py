"""The Engine protocol: what the training loop asks of whatever applies the update."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..model import MoETransformer


class Engine(Protocol):
    """Backward, gradient reduction, clipping, loss scaling and the optimizer step, behind one face.

    Per step the loop calls, for each of the `grad_accum` micro-batches,
    `with engine.micro_batch(last): loss = f(engine.model, ...); engine.backward(loss)`,
    then `engine.step()` once. It never asks which engine it holds.
    """

    model: nn.Module  # what the forward pass calls (may be a DDP or DeepSpeed wrapper)
    module: MoETransformer  # the bare MoETransformer inside it (last_aux, moe_layers, num_params)
    optimizer: torch.optim.Optimizer  # the loop sets the learning rate on its param groups

    def autocast(self) -> AbstractContextManager:
        """Context for a forward pass in the run's compute precision."""
        ...

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Context around one micro-batch's forward and backward; `last` ends the accumulation."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Backward of one micro-batch's loss ([] scalar, not divided by the accumulation)."""
        ...

    def step(self) -> bool:
        """Finish the step after the last micro-batch: True when the update was applied, False
        when it was skipped (non-finite loss or gradients). Gradients are cleared either way."""
        ...

    def grad_norm(self) -> float:
        """Global gradient norm of the last step, before clipping."""
        ...

    def state_bytes(self) -> int | None:
        """This rank's parameter + gradient + optimizer-state bytes at the last step, measured
        from its (local) tensors; None when the engine does not measure them."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The engine's own small state (e.g. the loss scaler) for the checkpoint's extra."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_checkpoint(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        """Save model + optimizer + `extra` (every rank calls it), in the engine's format."""
        ...

    def finish_checkpoint(self) -> None:
        """Finish a checkpoint still being written in the background (collective; no-op when
        none): before the next save, a load, and the end of training."""
        ...

    def load_latest(self, run_dir: Path) -> dict[str, Any] | None:
        """Load the newest checkpoint of run_dir in place; its `extra`, or None when there is none."""
        ...

"""The DeepSpeed engine: ZeRO for dense and expert state, experts in their own parameter groups."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoint import checkpoint_candidates, load_latest_checkpoint, save_checkpoint
from ..parallel import ParallelState
from ..parallel.launch_env import ensure_single_process_env
from ..parallel.memory import state_bytes
from ..parallel.objects import from_main
from ..parallel.parallelize import connect_process_groups
from .deepspeed_moe import (
    WithMoEMarker,
    check_engine_groups,
    check_version,
    name_expert_groups,
    register_expert_groups,
    tag_expert_params,
)
from .deepspeed_state import WholeState, whole_master_weights, zero_state_bytes

if TYPE_CHECKING:
    from ..model import MoETransformer


def deepspeed_initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parallel: ParallelState,
    *,
    num_experts: int,
    micro_batch: int,
    grad_accum: int,
    zero_stage: int,
    grad_clip: float,
    amp_dtype: torch.dtype | None,
):
    """Wrap model and optimizer with deepspeed.initialize; returns the engine.

    The optimizer arrives with experts in their own parameter groups (see training.optim).
    Distributed (any parallel.ep): the model's MoE layers get moe-train's groups (they do the
    all-to-all), and DeepSpeed's ZeRO shards dense state over the world and expert state over
    each expert's data-parallel group (moe-train's dp group), as engines.deepspeed_moe explains.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(
            "trainer.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'"
        ) from e
    ep = parallel.dims.ep
    if zero_stage > 0 and type(optimizer).__name__ == "Adafactor":
        raise ValueError(
            "optim.name=adafactor with trainer.engine=deepspeed and trainer.zero_stage>0: ZeRO "
            "steps the optimizer on flat 1-D partitions, where Adafactor's row/column statistics "
            "do not exist; use optim.name=adamw, trainer.zero_stage=0, or trainer.engine=native"
        )
    if ep > 1 and zero_stage not in (1, 2):
        raise ValueError(
            f"trainer.zero_stage={zero_stage} with parallel.ep={ep}: DeepSpeed reduces and shards "
            "expert state over their expert-data-parallel groups in ZeRO stages 1 and 2 only; "
            "use trainer.zero_stage=1 or 2 (or trainer.engine=native)"
        )
    check_version(ep)
    ensure_single_process_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    wrapped: nn.Module = model
    if parallel.dims.distributed:
        connect_process_groups(model, parallel.dims, parallel.groups)  # the all-to-all's groups
        tag_expert_params(model, ep)
        name_expert_groups(optimizer, ep)
        register_expert_groups(parallel)
        wrapped = WithMoEMarker(model, num_experts, ep)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max(0.0, grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": amp_dtype == torch.bfloat16},
        "fp16": {"enabled": amp_dtype == torch.float16, "loss_scale": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=config)
    if parallel.dims.distributed:
        check_engine_groups(engine, parallel)
    return engine


class DeepSpeedEngine:
    """deepspeed.initialize around the bare model: DeepSpeed casts the model, divides by the
    accumulation, reduces, clips, scales and steps itself, and counts the steps it skips (fp16
    overflow). Checkpoints are moe-train's DCP format (whole tensors per parameter gathered from
    ZeRO's partitions), so they resume on either engine at any parallel.ep."""

    def __init__(
        self,
        wrapped: Any,  # a deepspeed.DeepSpeedEngine (DeepSpeed ships no type information)
        module: MoETransformer,
        optimizer: torch.optim.Optimizer,
        parallel: ParallelState,
    ):
        """`wrapped`: deepspeed_initialize(module, optimizer, parallel, ...)."""
        self.model, self.module, self.optimizer = wrapped, module, optimizer
        self.parallel = parallel
        self._skipped_seen = 0  # DeepSpeed's skipped_steps at the end of the last step
        self._state_bytes: int | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine casts the model itself

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed tracks the accumulation boundary itself

    def backward(self, loss: Tensor) -> None:
        self.model.backward(loss)  # divides by grad_accum itself
        self.model.step()  # DeepSpeed steps every micro-batch; it updates at the boundary only

    def step(self) -> bool:
        skipped = self.model.skipped_steps
        applied = skipped == self._skipped_seen
        self._skipped_seen = skipped
        zero = self._zero()
        measured = zero_state_bytes(zero) if zero else state_bytes(self.module, self.optimizer)
        self._state_bytes = measured["total"]
        return applied

    def grad_norm(self) -> float:
        return float(self.model.get_global_grad_norm() or 0.0)

    def state_bytes(self) -> int | None:
        """This rank's state bytes at the last step, from ZeRO's own tensors (see
        engines.deepspeed_state.zero_state_bytes; the planner predicts the same terms)."""
        return self._state_bytes

    def state_dict(self) -> dict[str, Any]:
        """The loss scale as the native engine's GradScaler keeps it (empty unless fp16)."""
        scaler = getattr(self.model.optimizer, "loss_scaler", None)
        if not self.model.fp16_enabled() or scaler is None:
            return {"scaler": {}}
        return {
            "scaler": {
                "scale": float(scaler.cur_scale),
                "growth_factor": float(getattr(scaler, "scale_factor", 2.0)),
                "backoff_factor": 1.0 / float(getattr(scaler, "scale_factor", 2.0)),
                "growth_interval": int(getattr(scaler, "scale_window", 1000)),
                "_growth_tracker": 0,
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = getattr(self.model.optimizer, "loss_scaler", None)
        saved = state.get("scaler", {})
        if self.model.fp16_enabled() and scaler is not None and "scale" in saved:
            scaler.cur_scale = saved["scale"]

    def _zero(self) -> Any | None:
        """DeepSpeed's ZeRO 1/2 optimizer, or None when it steps the client optimizer itself."""
        inner = self.model.optimizer
        if hasattr(inner, "bit16_groups") and hasattr(inner, "single_partition_of_fp32_groups"):
            return inner
        if inner is self.optimizer:
            return None
        raise NotImplementedError(
            f"trainer.engine=deepspeed: checkpoints of DeepSpeed's {type(inner).__name__} are not "
            "supported; use trainer.zero_stage=1 or 2"
        )

    def save_checkpoint(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        """moe-train's DCP format (moe_train.checkpoint): whole fp32 weights and optimizer state
        per parameter, gathered from ZeRO's partitions (engines.deepspeed_state)."""
        zero = self._zero()
        if zero is None:
            save_checkpoint(run_dir, step, self.module, self.optimizer, extra, self.parallel, keep)
            return
        view = WholeState(zero, self.parallel)
        view.gather()
        with whole_master_weights(zero, self.parallel, load=False):
            # WholeState is optimizer-shaped (param_groups, state), all that a checkpoint reads
            save_checkpoint(run_dir, step, self.module, view, extra, self.parallel, keep)  # type: ignore[arg-type]

    def finish_checkpoint(self) -> None:
        pass  # saved synchronously

    def load_latest(self, run_dir: Path) -> dict[str, Any] | None:
        """The newest checkpoint of run_dir that verifies (written by either engine, any ep)."""
        if not from_main(self.parallel, lambda: checkpoint_candidates(run_dir)):
            return None  # nothing to allocate state for (that would count an optimizer step)
        zero = self._zero()
        if zero is None:
            found = load_latest_checkpoint(run_dir, self.module, self.optimizer, self.parallel)
            return None if found is None else found[1]
        view = WholeState(zero, self.parallel)
        view.allocate()
        with whole_master_weights(zero, self.parallel, load=True):
            found = load_latest_checkpoint(run_dir, self.module, view, self.parallel)  # type: ignore[arg-type]  # as in save
        view.scatter()
        return None if found is None else found[1]

"""The DeepSpeed engine: ZeRO for dense and expert state, experts in their own parameter groups."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..parallel.launch_env import ensure_single_process_env


def deepspeed_initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ep: int,
    micro_batch: int,
    grad_accum: int,
    zero_stage: int,
    grad_clip: float,
    amp_dtype: torch.dtype | None,
):
    """Wrap model and optimizer with deepspeed.initialize; returns the engine.

    The optimizer arrives with experts in their own parameter groups (see training.optim.build_optimizer).
    Data parallel only (parallel.ep=1): every rank holds every expert, and ZeRO (stage 0/1/2)
    reduces and shards dense and expert state alike over the world.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(
            "trainer.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'"
        ) from e
    if ep > 1:
        raise ValueError(
            f"trainer.engine=deepspeed with parallel.ep={ep}: DeepSpeed's ZeRO recognises expert "
            "parameters only inside its own deepspeed.moe.layer.MoE modules and would all-reduce "
            "moe-train's experts over the whole world. Use parallel.ep=1 with DeepSpeed (experts "
            "replicated, ZeRO shards their state too), or trainer.engine=native for expert parallelism"
        )
    ensure_single_process_env()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
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
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


class DeepSpeedEngine:
    """deepspeed.initialize around the bare model: DeepSpeed casts the model, divides by the
    accumulation, reduces, clips, scales and steps itself, and counts the steps it skips (fp16
    overflow). Its checkpoints are its own (ZeRO-partitioned) format, in run_dir/deepspeed."""

    def __init__(self, wrapped: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer):
        """`wrapped`: deepspeed_initialize(module, optimizer, ...)."""
        self.model, self.module, self.optimizer = wrapped, module, optimizer
        self._skipped_seen = 0  # DeepSpeed's skipped_steps at the end of the last step

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
        return applied

    def grad_norm(self) -> float:
        return float(self.model.get_global_grad_norm() or 0.0)

    def state_bytes(self) -> int | None:
        return None  # ZeRO keeps its state in flat partitions of its own: not measured here

    def state_dict(self) -> dict[str, Any]:
        return {}  # DeepSpeed's checkpoint holds its loss scaler and step counters

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_checkpoint(self, run_dir: Path, step: int, extra: dict[str, Any], keep: int) -> None:
        folder = Path(run_dir) / "deepspeed"  # DeepSpeed keeps every tag: `keep` does not apply
        self.model.save_checkpoint(str(folder), f"step_{step:08d}", client_state=extra)

    def finish_checkpoint(self) -> None:
        pass  # DeepSpeed saves synchronously

    def load_latest(self, run_dir: Path) -> dict[str, Any] | None:
        folder = Path(run_dir) / "deepspeed"
        if not (folder / "latest").exists():
            return None
        _, extra = self.model.load_checkpoint(str(folder))
        self._skipped_seen = self.model.skipped_steps
        return extra

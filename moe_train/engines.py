"""Optional engines. DeepSpeed: ZeRO for dense state, experts in their own parameter groups."""

from __future__ import annotations

import os
import socket

import torch
from torch import nn


def _ensure_env_for_single_process() -> None:
    """DeepSpeed always wants a process group; give a lone process a loopback one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


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

    The optimizer arrives with experts in their own parameter groups (see train.build_optimizer).
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
    _ensure_env_for_single_process()
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

"""The planner's prediction of the trainer's `mem/state_bytes`: one rank's real model built on the
meta device (moe_train.plan.meta_check.build_one_rank), its parameter shapes sharded by the
trainer's rule (moe_train.parallel.memory), so the prediction is exact, not a formula."""

from __future__ import annotations

from ..config import TrainConfig
from ..parallel.memory import (
    buffer_bytes,
    model_shapes,
    predicted_state_bytes,
    predicted_zero_state_bytes,
)
from .config import ClusterConfig
from .costs import compute_bytes
from .meta_check import build_one_rank
from .options import NOT_MODELLED as NOT_MODELLED_OPTIONS

NOT_MODELLED = [
    "pipeline and tensor parallelism (the trainer has neither)",
    "CPU offload of parameters or optimizer state (the trainer has none)",
    "allocator fragmentation and NCCL buffers beyond cluster.reserved_gb",
    "the optimizer's temporaries during its step (foreach/fused AdamW, Adafactor's statistics)",
    "overlap of communication with compute (times are added, not overlapped)",
    "uneven expert load (all-to-all and compute assume uniform routing)",
    "the costs of these trainer options: "
    + ", ".join(f"{key} ({why})" for key, why in NOT_MODELLED_OPTIONS.items()),
]


def state_bytes_per_gpu(cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, int]:
    """Parameter + gradient + optimizer-state (+ persistent buffer) bytes of the GPU holding the most (rank 0), as the
    trainer measures them (metrics.jsonl `mem/state_bytes`); integers. trainer.engine=deepspeed
    with ZeRO 1/2: DeepSpeed's flat partitions (moe_train.parallel.memory.predicted_zero_state_bytes).
    """
    ep, world, trainer = cfg.parallel.ep, cluster.world_size, cfg.trainer
    model = build_one_rank(cfg.model, cfg.router, ep, rank=0)
    shapes = model_shapes(model)
    if trainer.engine == "deepspeed" and trainer.zero_stage > 0 and world > 1:
        return predicted_zero_state_bytes(
            shapes, zero_stage=trainer.zero_stage, world=world, ep=ep, lp_bytes=compute_bytes(cfg)
        )
    return predicted_state_bytes(
        shapes,
        optimizer=cfg.optim.name,
        fsdp=cfg.parallel.fsdp,
        world=world,
        ep=ep,
        buffers=buffer_bytes(model),  # the balancing biases: [E] fp32 per MoE layer, replicated
    )

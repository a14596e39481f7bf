"""The planner's prediction of the trainer's `mem/state_bytes`: one rank's real model built on the
meta device (moe_train.plan.meta_check.build_one_rank), its parameter shapes sharded by the
trainer's rule (moe_train.parallel.memory), so the prediction is exact, not a formula."""

from __future__ import annotations

from typing import Any

from ..parallel.memory import model_shapes, predicted_state_bytes, predicted_zero_state_bytes
from .config import ClusterConfig
from .meta_check import build_one_rank

NOT_MODELLED = [
    "pipeline and tensor parallelism (the trainer has neither)",
    "CPU offload of parameters or optimizer state (the trainer has none)",
    "allocator fragmentation and NCCL buffers beyond cluster.reserved_gb",
    "the optimizer's temporaries during its step (foreach/fused AdamW, Adafactor's statistics)",
    "overlap of communication with compute (times are added, not overlapped)",
    "uneven expert load (all-to-all and compute assume uniform routing)",
]


def state_bytes_per_gpu(model: Any, router: Any, cluster: ClusterConfig) -> dict[str, int]:
    """Parameter + gradient + optimizer-state bytes of the GPU holding the most (rank 0), as the
    trainer measures them (metrics.jsonl `mem/state_bytes`); integers. trainer.engine=deepspeed
    with ZeRO 1/2: DeepSpeed's flat partitions (moe_train.parallel.memory.predicted_zero_state_bytes).
    """
    ep = cluster.ep or 1
    shapes = model_shapes(build_one_rank(model, router, ep, rank=0))
    if cluster.engine == "deepspeed" and cluster.zero_stage > 0 and cluster.world_size > 1:
        return predicted_zero_state_bytes(
            shapes, zero_stage=cluster.zero_stage, world=cluster.world_size, ep=ep,
            lp_bytes=4 if cluster.precision == "fp32" else cluster.compute_bytes,
        )  # fmt: skip
    return predicted_state_bytes(
        shapes, optimizer=cluster.optimizer, fsdp=cluster.fsdp, world=cluster.world_size, ep=ep
    )

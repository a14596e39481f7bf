"""The parallel layout (ep x dp) as a value, its process groups, `parallelize`, gradient policy.

build -> parallelize -> train:
    dims = ParallelDims(world_size, ep, rank)                      # pure value, no torch.distributed
    model = MoETransformer(model_cfg, router_cfg, shard=dims.expert_shard)   # any device, meta too
    groups = build_process_groups(dims, backend=..., timeout_s=..., device_type=...)
    model = parallelize(model, dims, groups, parallel_cfg)         # groups in, replicas, DDP
    ... backward; sync_gradients(model, dims, groups); clip_grad_norm_(model, 1.0, dims, groups)
`init_parallel` does the environment, device and group steps for the trainer (a ParallelState).
"""

from .config import ParallelConfig
from .dims import ParallelDims
from .errors import CollectiveError
from .grads import clip_grad_norm_, sync_gradients
from .groups import ProcessGroups, build_process_groups, teardown_process_group
from .parallelize import UsesProcessGroups, parallelize, unwrap_model
from .placement import ExpertShard, is_expert_param, mark_expert
from .runtime import ParallelState, init_parallel

__all__ = [
    "CollectiveError",
    "ExpertShard",
    "ParallelConfig",
    "ParallelDims",
    "ParallelState",
    "ProcessGroups",
    "UsesProcessGroups",
    "build_process_groups",
    "clip_grad_norm_",
    "init_parallel",
    "is_expert_param",
    "mark_expert",
    "parallelize",
    "sync_gradients",
    "teardown_process_group",
    "unwrap_model",
]

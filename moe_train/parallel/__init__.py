"""The parallel layout (ep x dp) as a value, its process groups, `parallelize`, gradient strategy.

build -> parallelize -> train:
    dims = ParallelDims(world_size, ep, rank)                      # pure value, no torch.distributed
    model = MoETransformer(model_cfg, router_cfg, shard=dims.expert_shard)   # any device, meta too
    groups = build_process_groups(dims, backend=..., timeout_s=..., device_type=...)
    sync = parallelize(model, dims, groups, parallel_cfg)          # groups in, replicas, DDP/FSDP
    with sync.no_sync(last=True): loss(sync.model(x)).backward()
    sync.sync(); norm = sync.clip(1.0)                             # the GradSync parallelize chose
`init_parallel` does the environment, device and group steps for the trainer (a ParallelState).
"""

from .config import ParallelConfig
from .dims import ParallelDims
from .errors import CollectiveError
from .grad_sync import DDPSync, FlatSync, FSDPSync, GradSync
from .groups import ProcessGroups, build_process_groups, teardown_process_group
from .parallelize import UsesProcessGroups, parallelize
from .placement import ExpertShard, is_expert_param, mark_expert
from .runtime import ParallelState, init_parallel

__all__ = [
    "CollectiveError",
    "DDPSync",
    "ExpertShard",
    "FSDPSync",
    "FlatSync",
    "GradSync",
    "ParallelConfig",
    "ParallelDims",
    "ParallelState",
    "ProcessGroups",
    "UsesProcessGroups",
    "build_process_groups",
    "init_parallel",
    "is_expert_param",
    "mark_expert",
    "parallelize",
    "teardown_process_group",
]

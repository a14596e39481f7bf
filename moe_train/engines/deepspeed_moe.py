"""moe-train's experts inside DeepSpeed's ZeRO, without DeepSpeed's MoE layer.

DeepSpeed (0.14 to 0.19) recognises expert parameters by attributes and expert groups by name:
- `deepspeed.moe.utils.is_moe_param(p)` is `p.allreduce is False`; `p.group_name` names the
  expert groups (`ep_size_<ep>`, a format `groups._get_max_expert_size` parses);
- `deepspeed.utils.groups` keeps the expert-parallel and expert-data-parallel groups in
  dictionaries under that name;
- the engine turns its MoE bookkeeping on (`has_moe_layers`, which hands the expert groups to
  the ZeRO optimizer) only when a module is a `deepspeed.moe.layer.MoE`, during its __init__.

So: moe-train's expert parameters are tagged (`tag_expert_params`), moe-train's OWN ep and dp
groups are registered under that name (`register_expert_groups`: the all-to-all and ZeRO's expert
reduction run on the very same group objects, and the ranks DeepSpeed reads back are checked
against moe-train's mesh), the optimizer's expert param groups are named (`name_expert_groups`),
and the model is wrapped with a parameterless `MoE` marker (`with_moe_marker`) so the engine sets
its bookkeeping itself. moe-train's routers, dispatcher and all-to-all do the forward pass.

Gradients (ZeRO 1/2, `DeepSpeedZeroOptimizer`): every bucket is divided by the dense
data-parallel size (the world), then dense slices are reduced over the world and expert slices
over their expert-data-parallel group: dense = SUM(world)/world and experts = SUM(edp)/world,
which is moe-train's rule (moe_train.parallel.grads), so no correction is needed. The clipping
norm: squares of each rank's partition summed over the world (every expert element lives on one
rank), i.e. the global norm over dense and expert gradients.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from ..parallel import ParallelState, is_expert_param

# The oldest DeepSpeed tested (pyproject pins >=0.16,<0.20; 0.16.0 and 0.19.8 pass the parity tests).
# Its ZeRO 1/2 divides expert gradients by the world (DeepSpeed PR 6546); 0.14.5 divides them by
# the expert-data-parallel size: ep times too large for moe-train's rule.
MIN_VERSION = (0, 16, 0)


def check_version(ep: int) -> None:
    """ValueError naming the installed DeepSpeed when it predates MIN_VERSION and ep > 1."""
    import deepspeed

    found = (deepspeed.__version_major__, deepspeed.__version_minor__, deepspeed.__version_patch__)
    if ep > 1 and tuple(found) < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        raise ValueError(
            f"trainer.engine=deepspeed with parallel.ep={ep} needs DeepSpeed >= {wanted} (found "
            f"{deepspeed.__version__}, whose ZeRO scales expert gradients ep times too large): "
            f"pip install 'deepspeed>={wanted}', or use trainer.engine=native"
        )


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of expert-parallel size `ep`."""
    return f"ep_size_{ep}"


def tag_expert_params(module: nn.Module, ep: int) -> int:
    """Mark moe-train's expert parameters as DeepSpeed expert parameters; returns how many."""
    count = 0
    for p in module.parameters():
        if is_expert_param(p):
            # the marks DeepSpeed's MoE code reads off a parameter (not attributes torch declares)
            p.allreduce = False  # type: ignore[attr-defined]
            p.group_name = expert_group_name(ep)  # type: ignore[attr-defined]
            count += 1
    return count


def name_expert_groups(optimizer: Any, ep: int) -> None:
    """Give the optimizer's expert param groups (`moe: True`, see training.optim) DeepSpeed's name."""
    for group in optimizer.param_groups:
        if group.get("moe"):
            group["name"] = expert_group_name(ep)


def register_expert_groups(parallel: ParallelState) -> None:
    """Register moe-train's ep and dp groups as DeepSpeed's expert-parallel and expert-data-parallel
    groups, then check that DeepSpeed reports the ranks of moe-train's mesh (ValueError if not)."""
    from deepspeed.utils import groups as ds_groups

    dims = parallel.dims
    name = expert_group_name(dims.ep)
    ep_ranks = next(r for r in dims.ep_groups() if dims.rank in r)
    dp_ranks = next(r for r in dims.dp_groups() if dims.rank in r)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = parallel.groups.ep
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = parallel.groups.dp
    if hasattr(ds_groups, "_EXPERT_PARALLEL_GROUP_RANKS"):  # DeepSpeed >= 0.15 keeps the ranks too
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dp_ranks
    seen = {
        "expert-parallel": dist.get_process_group_ranks(ds_groups._get_expert_parallel_group(name)),
        "expert-data-parallel": dist.get_process_group_ranks(
            ds_groups._get_expert_data_parallel_group(name)
        ),
    }
    wanted = {"expert-parallel": ep_ranks, "expert-data-parallel": dp_ranks}
    for kind, ranks in seen.items():
        if sorted(ranks) != sorted(wanted[kind]):
            raise ValueError(
                f"trainer.engine=deepspeed: DeepSpeed's {kind} group {name} on rank {dims.rank} "
                f"holds ranks {sorted(ranks)}, moe-train's mesh (parallel.ep={dims.ep}) "
                f"{sorted(wanted[kind])}; this DeepSpeed version keeps its groups differently: "
                "use a supported DeepSpeed (pyproject's deepspeed extra) or trainer.engine=native"
            )


def check_engine_groups(engine: Any, parallel: ParallelState) -> None:
    """After deepspeed.initialize: DeepSpeed's dense data-parallel group is the world and its MoE
    bookkeeping is on (ValueError naming what differs otherwise)."""
    if engine.dp_world_size != parallel.dims.world_size:
        raise ValueError(
            f"trainer.engine=deepspeed: DeepSpeed's data-parallel size is {engine.dp_world_size}, "
            f"moe-train's world {parallel.dims.world_size}: dense state must be sharded over every rank"
        )
    if not engine.has_moe_layers:
        raise ValueError(
            "trainer.engine=deepspeed: DeepSpeed did not enable its expert groups (has_moe_layers "
            "is False): expert gradients would be reduced over the world"
        )


def _moe_marker_class() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE

    class MoEMarker(MoE):
        """A `deepspeed.moe.layer.MoE` by type only: no parameters, never called. It turns the
        engine's MoE bookkeeping on; the groups are already registered (register_expert_groups)."""

        def __init__(self, num_experts: int, ep: int):
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no groups
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = expert_group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # moe-train's groups are registered under expert_group_name already

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("MoEMarker is a type tag for DeepSpeed; it is never called")

    return MoEMarker


class WithMoEMarker(nn.Module):
    """The model DeepSpeed wraps: `model` (the MoETransformer, called by forward) and a marker."""

    def __init__(self, model: nn.Module, num_experts: int, ep: int):
        super().__init__()
        self.model = model
        self.moe_marker = _moe_marker_class()(num_experts, ep)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

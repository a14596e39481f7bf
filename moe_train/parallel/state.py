"""Process groups, the (dp, ep) device mesh and the gradient-sync rules."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..routing import RouterConfig
from .config import ParallelConfig
from .errors import guarded

_BUCKET_ELEMS = 1 << 24  # gradients are all-reduced in flat buckets of at most this many elements


def is_expert_param(p: nn.Parameter) -> bool:
    return bool(getattr(p, "is_expert", False))


def unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, param) with tied parameters listed once, in module order."""
    return list(model.named_parameters(remove_duplicate=True))


@dataclass
class ParallelState:
    """Where this process sits in the world = dp x ep layout, and the collectives it needs.

    Global rank = dp_rank * ep + ep_rank, so an expert-parallel group is `ep` consecutive ranks.
    With one process every group is None and every collective is a no-op.
    """

    cfg: ParallelConfig
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: int = 1
    ep: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh
    ep_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ranks_per_node: int = 1
    intra_node_group: dist.ProcessGroup | None = None  # hierarchical a2a: ep ranks of my node
    inter_node_group: dist.ProcessGroup | None = None  # ep ranks with my local index, one per node
    dense_group: dist.ProcessGroup | None = None  # DDP's own world group (never shared with a2a)

    # ---- layout -----------------------------------------------------------------------------
    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def data_rank(self) -> int:
        """Every rank reads its own slice of the global batch (world-way data split)."""
        return self.rank

    @property
    def data_world(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def hierarchical(self) -> bool:
        return self.intra_node_group is not None

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside a DistributedDataParallel wrapper (or the model itself)."""
        return unwrap_model(model)

    def no_sync(self, model: nn.Module, last_micro_step: bool):
        """Context for one micro-step's backward: DDP reduces only on the last one."""
        if isinstance(model, DDP) and not last_micro_step:
            return model.no_sync()
        return contextlib.nullcontext()

    # ---- model ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Make replicas identical (dense params from rank 0, experts from dp-rank 0 of their
        dp group) and switch the MoE layers to the hierarchical all-to-all when configured.
        Returns the same module; gradients are reduced by `sync_gradients` after backward."""
        if not self.distributed:
            return model
        with torch.no_grad():
            for name, p in unique_params(model):
                if is_expert_param(p):
                    if self.dp > 1:
                        guarded(
                            f"broadcast({name})",
                            lambda p=p: dist.broadcast(p.data, group=self.dp_group, group_src=0),
                            "the dp group",
                        )
                else:
                    guarded(f"broadcast({name})", lambda p=p: dist.broadcast(p.data, src=0))
            for name, b in model.named_buffers():
                guarded(f"broadcast({name})", lambda b=b: dist.broadcast(b.data, src=0))
        for layer in _moe_layers(model):  # flat: ranks_per_node only counts inter-node bytes
            layer.dispatcher.set_hierarchy(
                self.intra_node_group, self.inter_node_group, self.ranks_per_node
            )
        if self.dense_group is None:
            return model
        # Dense grads: DDP all-reduces them in buckets while backward runs, on a process group of
        # its own so its collectives never interleave with the MoE all-to-alls. Experts are
        # ignored by DDP and reduced over their dp group in sync_gradients.
        experts = [name for name, p in unique_params(model) if is_expert_param(p)]
        model._ddp_params_and_buffers_to_ignore = experts  # DDP reads this attribute
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(
            model,
            device_ids=device_ids,
            process_group=self.dense_group,
            broadcast_buffers=False,
            init_sync=False,  # replicas were made identical above
        )

    def sync_gradients(self, model: nn.Module) -> None:
        """All-reduce after backward (and after gradient accumulation).

        Dense grads: SUM over the world / world. Expert grads: SUM over the dp group (ranks holding
        the same experts) / world: each rank's expert grads already hold the contributions of every
        token of its ep group (they came back through the all-to-all), so this is the gradient of
        the mean of the per-rank losses, exactly as with ep=1. No overlap with backward: the
        reduction runs here, in flat buckets, after the backward pass.
        """
        if not self.distributed:
            return
        if isinstance(model, DDP):  # dense grads were reduced during backward
            expert = [p.grad for _, p in unique_params(model.module) if is_expert_param(p)]
            expert = [g for g in expert if g is not None]
            if self.dp > 1:
                self._reduce_sum_scaled(expert, self.dp_group, "expert gradients over the dp group")
            elif expert:
                torch._foreach_div_(expert, float(self.world_size))
            return
        params = [p for _, p in unique_params(self.unwrap(model)) if p.requires_grad]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
        guarded("all_reduce(grad presence)", lambda: dist.all_reduce(has, op=dist.ReduceOp.MAX))
        for p, h in zip(params, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        dense = [p.grad for p in params if p.grad is not None and not is_expert_param(p)]
        expert = [p.grad for p in params if p.grad is not None and is_expert_param(p)]
        self._reduce_sum_scaled(dense, None, "dense gradients over the world")
        if self.dp > 1:
            self._reduce_sum_scaled(expert, self.dp_group, "expert gradients over the dp group")
        elif expert:
            torch._foreach_div_(expert, float(self.world_size))

    def _reduce_sum_scaled(self, grads: list[Tensor], group, what: str) -> None:
        """grads <- SUM over `group` / world_size, in flat buckets per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for tensors in by_dtype.values():
            for bucket in _buckets(tensors):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                guarded(f"all_reduce({what})", lambda flat=flat: dist.all_reduce(flat, group=group))
                flat.div_(self.world_size)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Global L2 norm of all gradients, each parameter counted once (dense grads are the same
        on every rank after sync; expert grads are summed over the ep group). Scales grads by
        min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Call after sync_gradients."""
        params = [p for _, p in unique_params(self.unwrap(model)) if p.grad is not None]
        dense = [p.grad for p in params if not is_expert_param(p)]
        expert = [p.grad for p in params if is_expert_param(p)]
        dev = params[0].grad.device if params else self.device

        def sq(gs: list[Tensor]) -> Tensor:
            if not gs:
                return torch.zeros((), dtype=torch.float32, device=dev)
            return torch.stack([g.detach().float().pow(2).sum() for g in gs]).sum()

        exp_sq = sq(expert)
        if self.ep > 1:
            guarded(
                "all_reduce(expert grad norm)",
                lambda: dist.all_reduce(exp_sq, group=self.ep_group),
                "the ep group",
            )
        norm = (sq(dense) + exp_sq).sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            grads = [p.grad for p in params]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    # ---- small collectives ------------------------------------------------------------------
    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """Mean of `t` over all ranks (a new tensor; `t` is untouched)."""
        if not self.distributed:
            return t.detach().clone()
        out = t.detach().clone().float() if not t.is_floating_point() else t.detach().clone()
        guarded("all_reduce(mean)", lambda: dist.all_reduce(out))
        return out / self.world_size

    def barrier(self) -> None:
        if self.distributed:
            guarded("barrier", lambda: dist.barrier())

    def shutdown(self) -> None:
        """Clean teardown: gc, barrier, destroy the process group (avoids gloo's exit abort)."""
        teardown_process_group()
        self.ep_group = self.dp_group = self.mesh = self.dense_group = None
        self.intra_node_group = self.inter_node_group = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DDP) else model


def teardown_process_group() -> None:
    """gc, barrier, destroy the default process group: the order that avoids gloo's abort at exit
    (drop your references to modules and groups first)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    out: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.numel() > _BUCKET_ELEMS:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return [b for b in out if b]


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    from ..layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _pg_options(backend: str, timeout: timedelta):
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
    elif backend == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
        opts = dist.ProcessGroupNCCL.Options()
    else:
        return None
    opts._timeout = timeout
    return opts


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_parallel(cfg: ParallelConfig, num_experts: int, router: RouterConfig) -> ParallelState:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), check the layout, create the
    process group (nccl for cuda, gloo for cpu unless parallel.backend says otherwise) with
    parallel.timeout_s, and the 2-D ("dp", "ep") DeviceMesh. No env: one process, no group."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    cfg.validate(world, num_experts, router)
    backend = cfg.backend
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    rpn = cfg.ranks_per_node or _env_int("LOCAL_WORLD_SIZE", world)
    state = ParallelState(
        cfg,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        dp=world // cfg.ep,
        ep=cfg.ep,
        device=device,
        ranks_per_node=rpn,
    )
    if world == 1:
        return state

    from torch.distributed.device_mesh import init_device_mesh

    timeout = timedelta(seconds=cfg.timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if use_cuda else {}
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world, **kwargs)
    opts = _pg_options(backend, timeout)
    override = {"dp": (backend, opts), "ep": (backend, opts)} if opts is not None else None
    mesh = init_device_mesh(
        device.type, (state.dp, state.ep), mesh_dim_names=("dp", "ep"), backend_override=override
    )
    state.mesh = mesh
    state.ep_group = mesh.get_group("ep")
    state.dp_group = mesh.get_group("dp")
    if cfg.hierarchical_a2a and cfg.ep > rpn and cfg.ep % rpn == 0:
        _init_node_groups(state, rpn, backend, timeout)
    if cfg.overlap_grad_sync:
        state.dense_group = dist.new_group(backend=backend, timeout=timeout)
    return state


def _init_node_groups(state: ParallelState, rpn: int, backend: str, timeout: timedelta) -> None:
    """Inside every ep group (consecutive ranks covering whole nodes of `rpn` ranks): the intra-node
    groups (my node's ep ranks) and the inter-node groups (one rank per node, same local index).
    Every rank creates every group, in the same order."""
    ep, nodes = state.ep, state.ep // rpn
    for d in range(state.dp):
        base = d * ep
        for n in range(nodes):
            ranks = [base + n * rpn + i for i in range(rpn)]
            g = dist.new_group(ranks, backend=backend, timeout=timeout)
            if state.rank in ranks:
                state.intra_node_group = g
        for local in range(rpn):
            ranks = [base + n * rpn + local for n in range(nodes)]
            g = dist.new_group(ranks, backend=backend, timeout=timeout)
            if state.rank in ranks:
                state.inter_node_group = g

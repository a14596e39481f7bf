"""Checks that run inside spawned gloo ranks (imported by the tests and by the ranks).

Every check builds a single-process reference on the whole global batch in each rank (no
communication) and the distributed module on this rank's slice (world-way data split: rank r
takes sequences [r*B/world, (r+1)*B/world)), then returns the largest differences; the test
process asserts on them so a failure names the case.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from moe_train.layer import MoELayer
from moe_train.model import ModelConfig, MoETransformer
from moe_train.ops.hashing import mix_seed
from moe_train.parallel import (
    FlatSync,
    GradSync,
    ParallelConfig,
    ParallelDims,
    ParallelState,
    ProcessGroups,
    init_parallel,
    parallelize,
)
from moe_train.routing import RouteKey, RouterConfig

D, FF, SEQ = 16, 24, 8


def router_cases(ep: int) -> dict[str, RouterConfig]:
    """Every router kind that can be split over `ep` ranks (tree: 7 experts, ep=1 only)."""
    cases = {
        "switch": RouterConfig(kind="switch", capacity_factor=1.25),
        "switch_drop": RouterConfig(kind="switch", capacity_factor=0.5),
        "topk": RouterConfig(kind="topk", top_k=2, capacity_factor=None),
        "topk_drop_pos": RouterConfig(
            kind="topk", top_k=2, capacity_factor=0.6, drop_policy="position"
        ),
        "prototype": RouterConfig(kind="prototype", top_k=2, capacity_factor=1.0),
        "sam": RouterConfig(kind="sam", top_k=2, num_groups=max(ep, 2), capacity_factor=None),
        "sam_drop": RouterConfig(kind="sam", top_k=2, num_groups=max(ep, 2), capacity_factor=0.5),
        "expert_choice": RouterConfig(kind="expert_choice", capacity_factor=2.0),
        # the current generation's options: sigmoid, 2 of 4 groups (fit ep 1, 2, 4), raw x 2.5
        "topk_modern": RouterConfig(
            kind="topk",
            top_k=2,
            score="sigmoid",
            num_groups=4,
            topk_groups=2,
            normalize_topk=False,
            route_scale=2.5,
            capacity_factor=1.0,
        ),  # fmt: skip
    }
    if ep == 1:
        cases["tree"] = RouterConfig(kind="tree", tree_depth=2, capacity_factor=1.5)
    return cases


def make_state(ep: int, num_experts: int = 8, timeout: float = 60.0, **kw) -> ParallelState:
    """A (dp, ep) layout on the already-running world (init_parallel reuses the process group)."""
    cfg = ParallelConfig(ep=ep, timeout_s=timeout, **kw)
    return init_parallel(cfg, num_experts, RouterConfig(kind="sam", num_groups=ep))


def _maxdiff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _rel(a: Tensor, b: Tensor) -> float:
    return _maxdiff(a, b) / max(1e-6, float(b.abs().max()) if b.numel() else 1.0)


def _push(layer: MoELayer, x: Tensor) -> None:
    """Make experts 0 and 1 win for every token: feature 0 of x is 1 and the gate favours them.
    Then ranks holding other experts receive no tokens (and, with capacity, tokens drop)."""
    x[..., 0] = 1.0
    with torch.no_grad():
        w = layer.router.gate.weight
        w[:, 0] = -6.0
        w[: min(2, w.shape[0]), 0] = 6.0
        if w.shape[0] >= 2:
            w[1, 0] = 5.0


def check_layer(
    state: ParallelState,
    rcfg: RouterConfig,
    num_experts: int = 8,
    batch: int = 8,
    seed: int = 0,
    push: bool = False,
) -> dict[str, float]:
    """Forward, input grads, router and expert grads (after sync) of one MoELayer vs reference."""
    E = rcfg.num_experts_for(num_experts)
    world, rank = state.dims.world_size, state.dims.rank
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, SEQ, D, generator=g)
    C = torch.randn(batch, SEQ, D, generator=g)
    torch.manual_seed(seed)
    ref = MoELayer(D, FF, E, router=rcfg, seed=seed, layer_id=3)
    torch.manual_seed(seed)
    lay = MoELayer(D, FF, E, router=rcfg, shard=state.dims.expert_shard, seed=seed, layer_id=3)
    if push:
        _push(ref, X)
        _push(lay, X)
    # the flat (after-backward) gradient sync; the DDP path runs in train_steps
    flat = replace(state.cfg, overlap_grad_sync=False)
    sync = parallelize(lay, state.dims, state.groups, flat)
    assert isinstance(sync, FlatSync) and sync.model is lay

    Xr = X.clone().requires_grad_()
    y_ref, aux_ref = ref(Xr, RouteKey(seed))
    loss_ref = (y_ref * C).sum() / (batch * SEQ) + sum(aux_ref.values())
    loss_ref.backward()

    per = batch // world
    lo = rank * per
    x = X[lo : lo + per].clone().requires_grad_()
    y, aux = lay(x, RouteKey(seed, lo * SEQ))
    loss = (y * C[lo : lo + per]).sum() / (per * SEQ) + sum(aux.values())
    loss.backward()
    sync.sync()

    first, n = lay.experts.first_expert, lay.experts.num_local
    out = {
        "y": _maxdiff(y, y_ref[lo : lo + per]),
        "loss": abs(float(state.all_reduce_mean(loss)) - float(loss_ref)),
        "x_grad": _maxdiff(x.grad, Xr.grad[lo : lo + per] * world),
        "router_grad": max(
            _maxdiff(p.grad, q.grad)
            for p, q in zip(lay.router.parameters(), ref.router.parameters())
        ),
        "w_in_grad": _maxdiff(lay.experts.w_in.grad, ref.experts.w_in.grad[first : first + n]),
        "w_out_grad": _maxdiff(lay.experts.w_out.grad, ref.experts.w_out.grad[first : first + n]),
        "grad_scale": float(ref.experts.w_out.grad.abs().max()),
        "dropped": float(lay.last_stats["dropped_frac"]),
        **{f"stat_{k}": float(v) for k, v in lay.last_stats.items()},
    }
    if rcfg.kind != "tree":
        # norm and clipping: global norm over ranks equals the reference's
        norm = sync.clip(0.0)
        ref_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters()))
        out["norm_rel"] = abs(float(norm) - float(ref_norm)) / float(ref_norm)
    return out


def expected_rows(
    state: ParallelState, rcfg: RouterConfig, seed: int, rpn: int, num_experts: int = 8
) -> dict[str, float]:
    """Re-route this rank's tokens and count (token, remote rank) and (token, remote node) pairs."""
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(8, SEQ, D, generator=g)
    torch.manual_seed(seed)
    ref = MoELayer(D, FF, num_experts, router=rcfg, seed=seed, layer_id=3)
    per = 8 // state.dims.world_size
    lo = state.dims.rank * per
    x = X[lo : lo + per].reshape(-1, D)
    a = ref.router(x, RouteKey(mix_seed(seed, 3), lo * SEQ), group_size=SEQ)
    ep = state.dims.ep
    per_rank = num_experts // ep
    dest = a.expert // per_rank
    me = state.dims.ep_rank
    ranks = torch.unique(a.token * ep + dest)
    r_dest = ranks % ep
    nodes = torch.unique(a.token * ep + dest // rpn)
    n_dest = nodes % ep
    return {
        "rows_all": float(ranks.numel()),
        "rows_remote_node_flat": float(((r_dest // rpn) != me // rpn).sum()),
        "rows_remote_node_hier": float((n_dest != me // rpn).sum()),
    }


# ---- whole model, a few optimizer steps ---------------------------------------------------------
def tiny_model_cfg(num_experts: int = 8) -> ModelConfig:
    return ModelConfig(
        vocab_size=48,
        seq_len=SEQ,
        d_model=D,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,  # the modern body with grouped-query attention and qk-norm
        qk_norm="head",
        d_ff=FF,
        num_experts=num_experts,
        moe_every=1,
    )


def build_model(
    state: ParallelState | None, rcfg: RouterConfig, seed: int = 0, lr: float = 3e-3
) -> tuple[GradSync, torch.optim.Optimizer]:
    """The tiny model parallelized on `state`'s layout (None: one process), and its AdamW.
    `.model` runs the forward pass (DDP with the default parallel.overlap_grad_sync), `.module`
    is the bare model (checkpoints)."""
    torch.manual_seed(seed)
    shard = state.dims.expert_shard if state else None
    model = MoETransformer(tiny_model_cfg(), rcfg, seed=seed, shard=shard)
    if state is None:
        sync = parallelize(model, ParallelDims(), ProcessGroups(), ParallelConfig())
    else:
        sync = parallelize(model, state.dims, state.groups, state.cfg)
    return sync, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def batch_slice(state: ParallelState | None, step: int, batch: int = 8, seed: int = 0):
    """This rank's (x, y, token_offset) of the global batch of `step`."""
    world = state.dims.world_size if state else 1
    rank = state.dims.rank if state else 0
    per = batch // world
    g = torch.Generator().manual_seed(mix_seed(seed, step))
    tokens = torch.randint(0, 48, (batch, SEQ + 1), generator=g)
    rows = tokens[rank * per : (rank + 1) * per]
    return rows[:, :-1], rows[:, 1:], rank * per * SEQ


def train_steps(
    state: ParallelState | None,
    sync: GradSync,
    opt: torch.optim.Optimizer,
    steps: range,
    seed: int = 0,
) -> dict[str, list[float]]:
    """AdamW steps with global-norm clipping 1.0; state None = single process on the whole batch.
    Returns the per-step global losses and grad norms."""
    losses, norms = [], []
    for step in steps:
        x, y, offset = batch_slice(state, step, seed=seed)
        logits, aux = sync.model(x, RouteKey(mix_seed(seed, step, 7), offset))
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        )
        loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if state is not None:
            sync.sync()
            norm = sync.clip(1.0)
            losses.append(float(state.all_reduce_mean(loss.detach())))
        else:  # torch's own clipping as the reference
            norm = torch.nn.utils.clip_grad_norm_(sync.module.parameters(), 1.0)
            losses.append(float(loss.detach()))
        norms.append(float(norm))
        opt.step()
    return {"losses": losses, "norms": norms}


@torch.no_grad()
def eval_logits(state: ParallelState | None, sync: GradSync, step: int = 99) -> Tensor:
    """This rank's logits on the batch of `step` (eval mode, no noise)."""
    sync.model.eval()
    x, _, offset = batch_slice(state, step)
    logits, _ = sync.model(x, RouteKey(5, offset))
    sync.model.train()
    return logits


def rel_close(a: list[float], b: list[float], tol: float) -> bool:
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=1e-7) for x, y in zip(a, b))


# ---- what each spawned group runs ----------------------------------------------------------------
CKPT_ROUTER = RouterConfig(kind="sam", top_k=2, num_groups=4, capacity_factor=None)
STEP_ROUTERS = {
    "switch": RouterConfig(kind="switch", capacity_factor=1.0),
    "topk": RouterConfig(kind="topk", top_k=2, capacity_factor=1.25),
    "prototype": RouterConfig(kind="prototype", top_k=2, capacity_factor=1.25),
    "sam": RouterConfig(kind="sam", top_k=2, num_groups=2, capacity_factor=1.25),
    "expert_choice": RouterConfig(kind="expert_choice", capacity_factor=2.0),
}
BYTES_ROUTERS = {
    "switch": RouterConfig(kind="switch", capacity_factor=None),
    "sam": RouterConfig(kind="sam", top_k=2, num_groups=2, capacity_factor=None),
    "topk": RouterConfig(kind="topk", top_k=2, capacity_factor=None, random_routing=False),
    # group-limited with one group per rank: a token reaches one rank, like SAM
    "topk_groups": RouterConfig(
        kind="topk",
        top_k=2,
        score="sigmoid",
        num_groups=2,
        topk_groups=1,
        capacity_factor=None,
        random_routing=False,
    ),  # fmt: skip
}
PUSH_ROUTERS = ("switch", "switch_drop", "topk", "expert_choice")


def layer_suite(state: ParallelState, seed: int) -> dict[str, dict[str, float]]:
    cases = router_cases(state.dims.ep)
    out = {name: check_layer(state, rc, seed=seed) for name, rc in cases.items()}
    for name in PUSH_ROUTERS:
        out[f"push_{name}"] = check_layer(state, cases[name], seed=seed + 1, push=True)
    return out


def ckpt_phase(state: ParallelState, ckpt_dir: str, save: bool) -> dict:
    from moe_train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    sync, opt = build_model(state, CKPT_ROUTER, seed=3 if save else 77)
    if save:
        train_steps(state, sync, opt, range(2), seed=3)
        save_checkpoint(ckpt_dir, 2, sync.module, opt, {"step": 2, "data": [1, 2]}, state)
        extra = {"step": 2, "data": [1, 2]}
    else:
        path = latest_checkpoint(ckpt_dir)
        assert path is not None, f"no checkpoint in {ckpt_dir}"
        extra = load_checkpoint(path, sync.module, opt, state)
    return {
        "extra": extra,
        "logits": eval_logits(state, sync),
        "next": train_steps(state, sync, opt, range(2, 4), seed=3)["losses"],
    }


def two_rank_main(rank: int, world: int, ckpt_dir: str) -> dict:
    state = make_state(2)
    res: dict = {"layer_ep2": layer_suite(state, seed=1)}
    res["bytes"] = {k: check_layer(state, rc, seed=4) for k, rc in BYTES_ROUTERS.items()}
    res["steps_ep2"] = {
        k: train_steps(state, *build_model(state, rc), range(3)) for k, rc in STEP_ROUTERS.items()
    }
    res["ckpt"] = ckpt_phase(state, ckpt_dir, save=True)
    state.shutdown()
    return res


def four_rank_main(rank: int, world: int, ckpt_dir: str) -> dict:
    res: dict = {}
    for ep in (2, 4, 1):
        state = make_state(ep)
        res[f"layer_ep{ep}"] = layer_suite(state, seed=10 + ep)
    state = make_state(2)  # dp=2 x ep=2
    res["steps_ep2"] = {
        k: train_steps(state, *build_model(state, rc), range(3)) for k, rc in STEP_ROUTERS.items()
    }
    state = make_state(4)
    res["steps_ep4"] = {
        k: train_steps(state, *build_model(state, rc), range(3))
        for k, rc in STEP_ROUTERS.items()
        if k != "sam"
    }
    res["ckpt"] = ckpt_phase(state, ckpt_dir, save=False)
    # hierarchical all-to-all: 2 "nodes" of 2 ranks vs flat (flat counts inter-node bytes too)
    flat = make_state(4, ranks_per_node=2)
    hier = make_state(4, ranks_per_node=2, hierarchical_a2a=True)
    assert hier.dims.hierarchical and not flat.dims.hierarchical
    res["hier"] = {}
    for name in ("switch", "topk", "sam", "switch_drop", "expert_choice"):
        rc = router_cases(4)[name]
        res["hier"][name] = {
            "flat": check_layer(flat, rc, seed=20),
            "hier": check_layer(hier, rc, seed=20),
            "push": check_layer(hier, rc, seed=21, push=True),
            "expect": expected_rows(hier, rc, seed=20, rpn=2),
        }
    hier.shutdown()
    return res

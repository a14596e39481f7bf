"""Shared helpers of the router tests (imported by the test modules of this folder)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_train.routing import Assignment, RouterConfig, build_router, router_kinds

KINDS = tuple(router_kinds())  # every registered kind: a new router is tested like the others
TOKEN_CHOICE = ("switch", "topk", "prototype", "sam", "tree")
D_MODEL = 16
NUM_EXPERTS = 8


def make_cfg(kind: str, **kw) -> RouterConfig:
    """Small defaults: top_k 2, SAM 2 groups of 4, dropless except expert choice (c = 2). The
    capacity given applies in eval mode too (eval_capacity_factor, unless given): these tests
    route in eval mode to leave the noise out and test capacity there."""
    base = dict(
        kind=kind,
        top_k=2,
        num_groups=2,
        capacity_factor=2.0 if kind == "expert_choice" else None,
    )
    base.update(kw)
    base.setdefault("eval_capacity_factor", base["capacity_factor"])
    return RouterConfig(**base)


def make_router(kind: str, seed: int = 0, num_experts: int = NUM_EXPERTS, **kw):
    cfg = make_cfg(kind, **kw)
    torch.manual_seed(seed)
    router = build_router(cfg, D_MODEL, cfg.num_experts_for(num_experts))
    if router.gate.bias is not None:  # exercise the bias (SAM): it is zero-initialised
        with torch.no_grad():
            router.gate.bias.normal_(0, 0.5)
    return router


def tokens(T: int, seed: int = 1, scale: float = 3.0) -> Tensor:
    """Random inputs, scaled so the (0.1-scale initialised) router is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D_MODEL, generator=g) * scale


def slot_keys(a: Assignment) -> Tensor:
    """One int64 key per slot, (token, expert)."""
    return a.token * a.num_experts + a.expert


def sorted_slots(a: Assignment) -> tuple[Tensor, Tensor, Tensor]:
    """(token, expert, weight) ordered by (token, expert)."""
    order = torch.argsort(slot_keys(a))
    return a.token[order], a.expert[order], a.weight[order]


def per_token(a: Assignment, k: int) -> tuple[Tensor, Tensor]:
    """expert [T, k] and weight [T, k] ordered by expert id; asserts k slots per token."""
    counts = torch.bincount(a.token, minlength=a.num_tokens)
    assert torch.all(counts == k), f"slots per token {counts.tolist()} != {k}"
    _, expert, weight = sorted_slots(a)
    return expert.view(-1, k), weight.view(-1, k)


def same_assignment(a: Assignment, b: Assignment, atol: float = 1e-6) -> None:
    ta, ea, wa = sorted_slots(a)
    tb, eb, wb = sorted_slots(b)
    assert torch.equal(ta, tb)
    assert torch.equal(ea, eb)
    torch.testing.assert_close(wa, wb, atol=atol, rtol=1e-5)


def node_level(expert: Tensor) -> Tensor:
    """Depth of heap node ids (root 0)."""
    return torch.floor(torch.log2(expert.double() + 1)).long()


def capacity_of(cfg: RouterConfig, gs: int, E: int) -> Tensor:
    """[E] capacity per expert of one routing group, from the formulas of the papers."""
    cf, k = cfg.capacity_factor, cfg.top_k
    if cfg.kind == "switch":
        c = [math.ceil(gs / E * cf)] * E
    elif cfg.kind in ("topk", "sam"):
        c = [math.ceil(gs * k / E * cf)] * E
    elif cfg.kind == "prototype":
        c = [k * math.ceil(gs / E * cf)] * E
    elif cfg.kind == "tree":
        c = [math.ceil(gs / 2 ** int(node_level(torch.tensor(e))) * cf) for e in range(E)]
    else:
        raise AssertionError(cfg.kind)
    return torch.tensor([max(1, v) for v in c])

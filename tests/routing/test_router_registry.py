"""The router registry: a router defined here, in this test file only, works end to end (build,
route, validation, parallel layout check, model, planner facts) with no edit anywhere else."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from moe_train.config import TrainConfig
from moe_train.model import ModelConfig, MoETransformer
from moe_train.parallel import ParallelConfig
from moe_train.plan import ClusterConfig, PlanOptions, count_params, distinct_ranks, make_plan
from moe_train.routing import (
    Assignment,
    RouteContext,
    Router,
    RouterConfig,
    SwitchRouter,
    build_router,
    register_router,
    router_class,
    router_kinds,
    unregister_router,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = ModelConfig(
    vocab_size=50, seq_len=16, d_model=16, n_layers=3, n_heads=2, d_ff=24, num_experts=8
)


class SigmoidTop1Router(Router):
    """Toy: each token goes to argmax z with weight sigmoid(z); a biased gate, its own aux loss,
    an even expert count and at most 2 expert-parallel ranks."""

    gate_bias: ClassVar[bool] = True
    aux_losses: ClassVar[tuple[str, ...]] = ("mean_logit",)

    @classmethod
    def check_config(cls, cfg: RouterConfig, num_experts: int) -> None:
        if num_experts % 2:
            raise ValueError(f"router.num_experts: toy needs an even count, got {num_experts}")

    @classmethod
    def check_layout(cls, cfg: RouterConfig, ep: int) -> None:
        if ep > 2:
            raise ValueError(f"parallel.ep: toy runs on at most 2 ranks, got {ep}")

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig) -> float:
        return 1

    def route(self, logits: Tensor, ctx: RouteContext) -> Assignment:
        T, E = logits.shape
        z, expert = logits.max(dim=-1)
        token = torch.arange(T, device=logits.device)
        w = torch.sigmoid(z)
        cap = self.capacity(ctx.group_size, 1)
        keep = self.keep(token, expert, self.priority(w, token, 0, T), cap, ctx)
        losses = {"mean_logit": logits.mean().square()}
        losses.update(self.z_loss_term(logits))
        return Assignment.from_slots(token, expert, w, keep, T, E, losses)


@pytest.fixture
def toy():
    register_router("toy")(SigmoidTop1Router)
    yield RouterConfig(kind="toy", capacity_factor=None)
    unregister_router("toy")


def test_toy_router_builds_and_routes(toy):
    assert router_kinds()[-1] == "toy" and router_class("toy") is SigmoidTop1Router
    r = build_router(toy, 16, 8)
    assert r.gate.bias is not None and r.gate.out_features == 8
    x = torch.randn(32, 16)
    a = r(x)
    assert a.num_slots == 32 and set(a.losses) == {"mean_logit", "z"}
    torch.testing.assert_close(a.weight, torch.sigmoid(r.gate(x).max(dim=-1).values))
    sum(a.losses.values()).backward()
    assert r.gate.bias.grad is not None and r.gate.bias.grad.abs().sum() > 0
    assert toy.experts_per_token() == 1 and toy.num_experts_for(8) == 8
    assert toy.effective_jitter == 0.0 and not toy.effective_random_routing


def test_toy_router_checks_its_fields_and_layout(toy):
    with pytest.raises(ValueError, match=r"router\.num_experts"):
        build_router(toy, 16, 7)
    with pytest.raises(ValueError, match=r"router\.capacity_factor"):  # the shared checks apply
        build_router(replace(toy, capacity_factor=-1.0), 16, 8)
    ParallelConfig(ep=2).validate(4, 8, toy)
    with pytest.raises(ValueError, match=r"parallel\.ep"):
        ParallelConfig(ep=4).validate(4, 8, toy)


def test_toy_router_in_the_model_and_the_planner(toy):
    model = MoETransformer(replace(SMALL), toy)
    logits, aux = model(torch.randint(0, 50, (2, 16)))
    (logits.square().mean() + aux).backward()
    assert set(model.last_aux) == {"mean_logit", "z"}
    real, pc = model.num_params(), count_params(SMALL, toy)
    assert (pc.dense, pc.experts) == (real["dense"], real["expert"])  # gate bias counted
    assert pc.router == 16 * 8 + 8
    # default expected ranks: one uniform pick over 2 ranks -> one rank
    assert distinct_ranks(toy, 8, 2) == pytest.approx(1.0)
    cluster, cfg = ClusterConfig(world_size=2), TrainConfig(model=SMALL, router=toy)
    cfg.parallel.ep = 2
    plan = make_plan(cfg, cluster, PlanOptions(suggest=False))
    assert plan["meta_check"]["match"] and plan["params"]["experts_per_token"] == 1
    assert plan["routers"][0]["router"] == "toy (configured)"
    switch = make_plan(replace(cfg, router=RouterConfig()), cluster, PlanOptions(meta_check=False))
    assert "toy" in [row["router"] for row in switch["routers"]]  # compared like the built-ins


def test_unknown_kind_lists_the_registered_ones(toy):
    with pytest.raises(ValueError, match=r"router\.kind: got 'bogus'; allowed: switch, .*toy"):
        RouterConfig(kind="bogus").validate(8)


def test_a_kind_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_router("switch")(SigmoidTop1Router)
    assert router_class("switch") is SwitchRouter


def test_unregistered_after_the_test():
    assert "toy" not in router_kinds()


KIND_COMPARISON = re.compile(
    r"\bkind\s*(==|!=|\bin\b|\bnot\s+in\b)|(==|!=)\s*[\w.\[\]\"']*\bkind\b"
)
FOR_IN = re.compile(r"\bfor\b.*?\bin\b")  # `for key, kind in ...` iterates, it does not compare


LITERAL = re.compile(r"[\"']([\w-]+)[\"']")


def compares_a_router_kind(line: str) -> bool:
    """A kind comparison whose string literals (if any) include a router kind.

    `p.kind == "cuda"` (a kernel build's device) is not about routers; `kind in KINDS` is.
    """
    if not KIND_COMPARISON.search(FOR_IN.sub("", line)):
        return False
    literals = LITERAL.findall(line)
    return not literals or any(name in router_kinds() for name in literals)


def kind_comparisons(text: str) -> list[str]:
    return [
        f"{i}: {line.strip()}"
        for i, line in enumerate(text.splitlines(), 1)
        if compares_a_router_kind(line)
    ]


def test_kind_comparison_pattern():
    bad = 'if router.kind == "sam":\nif kind in ("topk", "sam"):\nx = "tree" != cfg.kind'
    assert len(kind_comparisons(bad)) == 3
    assert not kind_comparisons("for key, kind in pairs:\ncls = router_class(router.kind)")
    assert not kind_comparisons('if build.kind == "cuda":')


def test_no_router_kind_comparisons_outside_routing():
    """Router facts are looked up through the registry, not by comparing kind strings."""
    package = ROOT / "moe_train"
    files = [p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "routing"]
    files.append(ROOT / "benchmarks" / "comm_volume.py")
    hits = [f"{p.relative_to(ROOT)}:{h}" for p in files for h in kind_comparisons(p.read_text())]
    assert len(files) > 20 and not hits, "\n".join(hits)

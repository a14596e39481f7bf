"""The MoE layer and a short training run on a GPU: grouped GEMM vs the loop, bf16 vs a CPU fp32
run, and no host syncs on the local (ep=1) path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_train import MoELayer, MoETransformer, RouteKey, RouterConfig
from moe_train.experts.grouped import grouped_mm_supported, pick_backend
from moe_train.model import ModelConfig

pytestmark = pytest.mark.usefixtures("cuda_ext")
DEV = "cuda"
ROUTERS = {
    "switch": dict(kind="switch"),
    "topk": dict(kind="topk", top_k=2, random_routing=False),
    "sam": dict(kind="sam", top_k=2, num_groups=2),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))


def layer_step(layer: MoELayer, x: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    """Forward + backward; returns [y, x.grad, w_in.grad, w_out.grad, gate.grad] in float."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        y, losses = layer(x, RouteKey(5))
        loss = y.float().square().mean() + sum(losses.values())
    loss.backward()
    grads = [
        x.grad,
        layer.experts.w_in.grad,
        layer.experts.w_out.grad,
        layer.router.gate.weight.grad,
    ]
    return [y.detach().float().cpu(), *(g.float().cpu() for g in grads)]


def hopper_or_newer() -> bool:
    t = torch.zeros(16, 16, device=DEV, dtype=torch.bfloat16)
    return grouped_mm_supported(t, t.view(1, 16, 16), t.view(1, 16, 16))


@pytest.mark.parametrize("kind", sorted(ROUTERS))
@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_grouped_gemm_and_loop_agree_in_bf16(kind, capacity_factor):
    if not hopper_or_newer():
        pytest.skip("torch runs _grouped_mm natively on sm_90/sm_100 only")
    cfg = RouterConfig(capacity_factor=capacity_factor, **ROUTERS[kind])
    torch.manual_seed(0)
    layer = MoELayer(256, 512, 8, router=cfg, activation="swiglu").to(DEV)
    x = torch.randn(4, 128, 256, device=DEV)
    results = {}
    for backend in ("grouped", "loop"):
        layer.experts.backend = backend
        results[backend] = layer_step(layer, x, bf16=True)
    w_in, w_out = (w.detach().to(torch.bfloat16) for w in (layer.experts.w_in, layer.experts.w_out))
    assert pick_backend(x.view(-1, 256).to(torch.bfloat16), w_in, w_out) == "grouped"  # auto
    for got, want in zip(results["grouped"], results["loop"]):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_layer_in_bf16_on_the_gpu_matches_fp32_on_the_cpu(kind):
    cfg = RouterConfig(capacity_factor=None, **ROUTERS[kind])
    torch.manual_seed(0)
    cpu = MoELayer(128, 256, 8, router=cfg, activation="gelu", init_std=0.1)
    gpu = copy.deepcopy(cpu).to(DEV)
    x = torch.randn(2, 64, 128)
    want = layer_step(cpu, x, bf16=False)
    got = layer_step(gpu, x.to(DEV), bf16=True)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 3e-2


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_dropless_local_layer_never_waits_for_the_gpu(kind):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call."""
    cfg = RouterConfig(capacity_factor=None, **ROUTERS[kind])
    layer = MoELayer(256, 512, 8, router=cfg, activation="swiglu").to(DEV)
    x = torch.randn(4, 128, 256, device=DEV, requires_grad=True)
    layer_step(layer, x, bf16=True)  # warm-up: builds, one-time probes, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast(DEV, torch.bfloat16):
            y, losses = layer(x, RouteKey(7))
            loss = y.float().square().mean() + sum(losses.values())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert x.grad is not None


def test_three_training_steps_in_bf16_match_fp32_on_the_cpu():
    cfg = ModelConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=2, n_heads=4, d_ff=256,
                      num_experts=8, moe_every=1, activation="swiglu")  # fmt: skip
    router = RouterConfig(kind="topk", top_k=2, capacity_factor=None, random_routing=False)
    torch.manual_seed(0)
    cpu = MoETransformer(cfg, router, seed=1)
    gpu = copy.deepcopy(cpu).to(DEV)
    start = {n: p.detach().clone() for n, p in cpu.named_parameters()}
    batches = [torch.randint(0, 256, (8, 64)) for _ in range(3)]
    losses = {}
    for name, model, dev, bf16 in (("cpu", cpu, "cpu", False), ("gpu", gpu, DEV, True)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for step, idx in enumerate(batches):
            idx = idx.to(dev)
            with torch.autocast(dev, torch.bfloat16, enabled=bf16):
                logits, aux = model(idx[:, :-1], RouteKey(step))
                loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()) + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name].append(float(loss.detach()))
    torch.testing.assert_close(losses["gpu"], losses["cpu"], atol=3e-2, rtol=1e-2)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        # Adam's steps are about lr whatever the gradient: compare their directions
        want, got = p.detach() - start[name], q.detach().cpu() - start[name]
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9, name

"""Training throughput and MFU of a ~1B-parameter MoE LM on one GPU.

The model (default: d 1024, 12 layers, every FFN an MoE of 16 SwiGLU experts of width 1792, top-2,
dropless, vocab 32768, sequences of 2048: 1.1B parameters, 0.22B active per token) trains on
random tokens with fused AdamW under bf16 autocast (fp32 master weights), as the trainer does.
Tokens/s are timed over the steps after the warm-up with CUDA events; model FLOPs per token come
from moe_train.plan.costs (the planner's: 6 x active matmul parameters + attention), MFU is
achieved FLOP/s over the GPU's dense bf16 peak (moe_train.hardware's datasheet table, as the
trainer's metrics use; --peak-tflops overrides).

    python benchmarks/gpu_train.py                  # 100 steps, writes gpu_train.json
    python benchmarks/gpu_train.py --quick          # a few steps of a small model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, gpu_missing, machine, machine_line, parse_args, publish  # noqa: E402

from moe_train import MoETransformer, RouterConfig  # noqa: E402
from moe_train.hardware import peak_tflops  # noqa: E402
from moe_train.model import ModelConfig  # noqa: E402
from moe_train.plan.costs import model_flops_per_token  # noqa: E402
from moe_train.plan.params import count_params  # noqa: E402
from moe_train.routing import RouteKey  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10, help="steps not timed")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-d-ff", type=int, default=1792)
    p.add_argument("--moe-every", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    p.add_argument("--backend", default="auto", choices=["auto", "grouped", "loop"])
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default="cuda")
    add_output_args(p, "a small model, a few steps")
    a = parse_args(p, argv)
    if a.quick:
        a.steps, a.warmup, a.d_model, a.layers, a.heads = 4, 1, 256, 2, 4
        a.expert_d_ff, a.vocab, a.seq_len, a.batch = 512, 1024, 256, 2
    return a


def build(
    a: argparse.Namespace, dev: torch.device
) -> tuple[MoETransformer, ModelConfig, RouterConfig]:
    cfg = ModelConfig(
        vocab_size=a.vocab, seq_len=a.seq_len, d_model=a.d_model, n_layers=a.layers,
        n_heads=a.heads, d_ff=4 * a.d_model, num_experts=a.experts, expert_d_ff=a.expert_d_ff,
        moe_every=a.moe_every, activation="swiglu",
    )  # fmt: skip
    router = RouterConfig(
        kind="topk", top_k=a.top_k, capacity_factor=a.capacity_factor, random_routing=False
    )
    torch.manual_seed(0)
    model = MoETransformer(cfg, router).to(dev)
    for layer in model.moe_layers():
        layer.experts.backend = a.backend
    return model, cfg, router


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    dev = torch.device(a.device)
    if gpu_missing(dev.type):
        return {}
    model, cfg, router = build(a, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    counts = model.num_params()
    pc = count_params(cfg, router)
    per_token = model_flops_per_token(cfg, router)  # the trainer's MFU numerator (plan/costs.py)
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens = a.batch * a.seq_len

    def step(i: int) -> torch.Tensor:
        idx = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), device=dev, generator=gen)
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            logits, aux = model(idx[:, :-1], RouteKey(i))
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    t_start = time.perf_counter()
    for i in range(a.warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    losses = [step(a.warmup + i) for i in range(a.steps)]
    if dev.type == "cuda":
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - t0
    tok_s = tokens * a.steps / seconds
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = a.peak_tflops or peak_tflops(name)
    mfu = per_token * tok_s / (peak * 1e12) if peak else None
    mach = machine(dev.type)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "params_total": counts["dense"] + counts["expert"],
        "params_active_matmul": pc.active(router.experts_per_token()) - pc.lookup_only,
        "model_flops_per_token": per_token,
        "tokens_per_step": tokens,
        "step_ms": seconds / a.steps * 1e3,
        "tokens_per_s": tok_s,
        "achieved_tflops": per_token * tok_s / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": mfu,
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30
        if dev.type == "cuda"
        else None,
        "loss_first_last": [float(losses[0]), float(losses[-1])],
        "wall_s": time.perf_counter() - t_start,
    }
    print(machine_line(mach))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    result = publish("gpu_train", mach, result, a.out)
    mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a (unknown peak: --peak-tflops)"
    print(
        f"\n{name}: {result['params_total'] / 1e9:.2f}B params, {tok_s:,.0f} tokens/s, "
        f"{result['step_ms']:.1f} ms/step, {result['achieved_tflops']:.0f} TFLOP/s, MFU {mfu_text}"
    )
    return result


if __name__ == "__main__":
    main()

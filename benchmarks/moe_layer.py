"""One MoE layer, forward + backward, against the dense FFN of equal active FLOPs.

For every case (d_model x router x capacity factor) the contenders run interleaved in one process
(order rotated every round) and each round's time is divided by the same round's dense time; the
reported ratio is the median of those per-round ratios, so a loaded machine moves both sides of
a ratio together. Dense floor = the model's DenseFFN of width k*d_ff over all tokens (the same
expert FLOPs, no routing, no dispatch, no drops). moe-train runs each expert backend asked for
(`--backends`: loop, grouped = torch._grouped_mm, auto).

CPU (default): fp32, 1 thread, CPU time of the process (`--clock cpu`: time spent computing, not
time waiting for a core of a shared machine; use `--clock wall` on an idle one), host memory as
the trainer keeps it (`--host-memory reuse`: freed blocks stay for the next step; `release` for
the C library's default, where every large gradient is faulted in afresh each step). DeepSpeed and
fairscale join with `--peers` (1-process gloo group; skipped with a note when missing).
GPU (`--device cuda`): bf16 autocast over fp32 weights as in training, CUDA-event times, the
shape presets `--preset coarse` (d 4096, d_ff 14336, 8 experts, top-2, SwiGLU, 16k tokens) and
`--preset fine` (d 2048, d_ff 1408, 64 experts, top-6, SwiGLU, 16k tokens).

    python benchmarks/moe_layer.py --d-model 256 512 1024      # the CPU sweep (docs/RESULTS.md)
    python benchmarks/moe_layer.py --device cuda --preset coarse fine --backends grouped loop
    python benchmarks/moe_layer.py --quick                     # seconds, for CI
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_args,
    gpu_missing,
    machine,
    machine_line,
    median,
    parse_args,
    print_table,
    publish,
)

from moe_train import MoELayer, RouteKey  # noqa: E402
from moe_train.model import DenseFFN  # noqa: E402
from moe_train.parallel.launch_env import ensure_single_process_env  # noqa: E402
from moe_train.routing import RouterConfig  # noqa: E402
from moe_train.training.host_memory import HOST_MEMORY, set_host_memory  # noqa: E402

PRESETS = {  # GPU shapes of issue #14 (bf16, SwiGLU)
    "coarse": dict(d_model=4096, d_ff=14336, experts=8, router="topk", k=2, tokens=16384),
    "fine": dict(d_model=2048, d_ff=1408, experts=64, router="topk", k=6, tokens=16384),
}
ROUTERS = {"top1": ("switch", 1), "top2": ("topk", 2), "sam2": ("sam", 2)}

Step = Callable[[], float]  # forward + backward; returns the dropped fraction (nan if unknown)


class FFN(nn.Module):
    """The peers' expert: Linear -> GELU(tanh) -> Linear, no biases."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.w_in = nn.Linear(d, h, bias=False)
        self.w_out = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


# ---- contenders: each returns a step() closure doing forward + backward ------------------------


def router_config(case: dict) -> RouterConfig:
    kind, k, cf = case["router"], case["k"], case["capacity_factor"]
    extra = {"num_groups": case["sam_groups"]} if kind == "sam" else {}
    # no random 2nd expert: the floor computes every slot, so should we (drops are measured)
    return RouterConfig(kind=kind, top_k=k, capacity_factor=cf, random_routing=False, **extra)


def make_layer(case: dict, dev: torch.device) -> MoELayer:
    return MoELayer(
        case["d_model"],
        case["d_ff"],
        case["experts"],
        router=router_config(case),
        activation=case["activation"],
    ).to(dev)


def make_ours(layer: MoELayer, case: dict, backend: str, dev: torch.device, autocast: bool) -> Step:
    """One step of `layer` with the expert backend `backend` (the layer is shared by the backends:
    the same weights, one initialisation)."""
    x = torch.randn(case["tokens"], case["d_model"], device=dev, requires_grad=True)

    def step() -> float:
        layer.experts.backend = backend
        layer.zero_grad(set_to_none=True)  # as a training step does: no accumulation
        x.grad = None
        with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            y, losses = layer(x, RouteKey(1))
            loss = y.float().square().mean() + sum(losses.values())
        loss.backward()
        return layer.last_stats.get("dropped_frac", float("nan")) if dev.type == "cpu" else 0.0

    return step


def make_dense(case: dict, dev: torch.device, autocast: bool) -> Step:
    ffn = DenseFFN(case["d_model"], case["k"] * case["d_ff"], case["activation"]).to(dev)
    x = torch.randn(case["tokens"], case["d_model"], device=dev, requires_grad=True)

    def step() -> float:
        ffn.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            loss = ffn(x).float().square().mean()
        loss.backward()
        return 0.0

    return step


def make_deepspeed(case: dict) -> Step:
    from deepspeed.moe.layer import MoE

    d, h, cf = case["d_model"], case["d_ff"], case["capacity_factor"]
    layer = MoE(
        hidden_size=d,
        expert=FFN(d, h),
        num_experts=case["experts"],
        ep_size=1,
        k=case["k"],
        capacity_factor=cf or 1.0,
        eval_capacity_factor=cf or 1.0,
        min_capacity=0,
        drop_tokens=cf is not None,
    )
    x = torch.randn(1, case["tokens"], d, requires_grad=True)

    def step() -> float:
        y, l_aux, _ = layer(x)
        (y.square().mean() + l_aux).backward()
        return float("nan")

    return step


def init_single_process_group() -> None:
    if dist.is_initialized():
        return
    ensure_single_process_env()
    dist.init_process_group("gloo", rank=0, world_size=1)


def peers_available() -> dict[str, str | None]:
    """name -> None if importable, else the reason it is skipped."""
    out: dict[str, str | None] = {}
    for name, mod in (("deepspeed", "deepspeed.moe.layer"),):
        try:
            __import__(mod)
            out[name] = None
        except Exception as e:  # noqa: BLE001 - any import failure means: skip this peer
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
    return out


# ---- timing ------------------------------------------------------------------------------------


class Clock:
    """Seconds of one call: CUDA events (GPU), CPU time of the process, or wall time."""

    def __init__(self, kind: str, dev: torch.device):
        self.kind, self.dev = kind, dev

    def __call__(self, fn: Step) -> tuple[float, float]:
        if self.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        now = time.process_time if self.kind == "cpu" else time.perf_counter
        t0 = now()
        out = fn()
        return now() - t0, out


def run_case(steps: dict[str, Step], clock: Clock, warmup: int, repeats: int) -> dict:
    """Interleave the contenders; per-round ratios against the dense floor (the last one)."""
    names = list(steps)
    floor = names[-1]
    times: dict[str, list[float]] = {n: [] for n in names}
    drops: dict[str, float] = {}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for n in order:
            dt, drops[n] = clock(steps[n])
            if r >= warmup:
                times[n].append(dt)
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[floor])]
        out[n] = {
            "median_s": median(times[n]),
            "min_s": min(times[n]),
            "times_s": times[n],
            "vs_dense": median(ratios),  # median of the per-round ratios
            "dropped_frac": drops[n],
        }
    return out


# ---- cases -------------------------------------------------------------------------------------


def cases(a: argparse.Namespace) -> list[dict]:
    if a.preset:
        out = []
        for name, cf in itertools.product(a.preset, a.capacity_factor):
            p = PRESETS[name]
            out.append(
                dict(
                    name=name,
                    d_model=p["d_model"],
                    d_ff=p["d_ff"],
                    experts=p["experts"],
                    router=p["router"],
                    k=p["k"],
                    tokens=a.tokens or p["tokens"],
                    capacity_factor=cf,
                    activation="swiglu",
                    sam_groups=a.sam_groups,
                )
            )
        return out
    out = []
    for d, label, cf in itertools.product(a.d_model, a.routers, a.capacity_factor):
        kind, k = ROUTERS[label]
        out.append(
            dict(
                name=label,
                d_model=d,
                d_ff=a.d_ff or a.d_ff_mult * d,
                experts=a.experts,
                router=kind,
                k=k,
                tokens=a.tokens or 8192,
                capacity_factor=cf,
                activation=a.activation,
                sam_groups=a.sam_groups,
            )
        )
    return out


def contenders(case: dict, a: argparse.Namespace, dev: torch.device, peers: dict) -> dict:
    autocast = dev.type == "cuda"
    torch.manual_seed(0)
    layer = make_layer(case, dev)
    steps: dict[str, Step] = {}
    for backend in a.backends:
        torch.manual_seed(1)  # the same input for every backend
        steps[f"moe-train ({backend})"] = make_ours(layer, case, backend, dev, autocast)
    if a.peers and dev.type == "cpu" and case["router"] in ("switch", "topk"):
        if peers.get("deepspeed") is None:
            steps["deepspeed"] = make_deepspeed(case)
    torch.manual_seed(1)
    steps[f"dense FFN (d_ff {case['k'] * case['d_ff']})"] = make_dense(case, dev, autocast)
    return steps


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), help="GPU shapes (issue #14)")
    p.add_argument("--tokens", type=int, default=None, help="default 8192 (presets: 16384)")
    p.add_argument("--d-model", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--d-ff", type=int, default=None, help="expert width (default d-ff-mult * d)")
    p.add_argument("--d-ff-mult", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--activation", default="gelu", choices=["gelu", "swiglu"])
    p.add_argument(
        "--capacity-factor",
        nargs="+",
        type=lambda v: None if v.lower() in ("none", "null", "dropless") else float(v),
        default=[1.25, None],
        help="capacity factors; 'none' = dropless",
    )
    p.add_argument("--routers", nargs="+", default=["top1", "top2"], choices=sorted(ROUTERS))
    p.add_argument("--sam-groups", type=int, default=4, help="SAM device groups (E/G experts each)")
    p.add_argument(
        "--backends", nargs="+", default=["auto"], choices=["auto", "loop", "grouped", "padded"]
    )
    p.add_argument("--peers", action="store_true", help="add DeepSpeed (CPU, top-1/top-2)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="CPU device only")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    p.add_argument(
        "--host-memory",
        default="reuse",
        choices=list(HOST_MEMORY),
        help="the trainer's trainer.host_memory for this process (default reuse, as the trainer)",
    )
    add_output_args(p, "small shapes, few repeats (CI)")
    a = parse_args(p, argv)
    if a.quick:
        a.tokens, a.d_model, a.experts, a.repeats, a.warmup = 512, [64], 8, 2, 1
        a.preset = None if a.device == "cpu" else ["fine"]
        a.tokens = 512 if a.device == "cpu" else 2048
    if a.clock == "cpu" and a.threads != 1 and a.device == "cpu":
        p.error("--clock cpu adds up the time of every thread: use it with --threads 1")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    dev = torch.device(a.device)
    if gpu_missing(dev.type):
        return {}
    torch.set_num_threads(a.threads)
    host_memory_kept = set_host_memory(a.host_memory)
    peers: dict[str, str | None] = {}
    if a.peers:
        os.environ.setdefault(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "moe_train" / "torch_extensions")
        )
        init_single_process_group()
        peers = peers_available()
        for name, why in peers.items():
            if why:
                print(f"note: {name} not available ({why}); skipping it (pip install -e .[bench])")
        if peers.get("deepspeed") is None:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from moe_train import ops

    mach = machine(dev.type)
    mach["moe_train_fused_ops"] = ops.extension_available()
    mach["host_memory"] = a.host_memory + ("" if host_memory_kept else " (C library default)")
    clock = Clock(a.clock if dev.type == "cpu" else "cuda", dev)
    dtype = "bf16 autocast" if dev.type == "cuda" else "fp32"
    print(machine_line(mach))
    print(
        f"{dtype}, clock: {clock.kind}, fused ops: {mach['moe_train_fused_ops']}, "
        f"host memory: {mach['host_memory']}"
    )
    results, rows = [], []
    for case in cases(a):
        steps = contenders(case, a, dev, peers)
        res = run_case(steps, clock, a.warmup, a.repeats)
        results.append({**case, "dtype": dtype, "contenders": res})
        cf = "dropless" if case["capacity_factor"] is None else case["capacity_factor"]
        for n, r in res.items():
            rows.append(
                [
                    case["d_model"],
                    f"{case['name']} (k={case['k']})",
                    cf,
                    n,
                    f"{r['median_s'] * 1e3:.1f}",
                    f"{r['vs_dense']:.3f}x",
                    "" if math.isnan(r["dropped_frac"]) else f"{r['dropped_frac']:.3f}",
                ]
            )
        print(f"  d {case['d_model']} {case['name']} cf {cf} done", flush=True)
        del steps
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print_table(
        [
            "d_model",
            "router",
            "capacity",
            "contender",
            "median ms",
            "time / dense floor",
            "dropped",
        ],
        rows,
    )
    fields = {
        "device": a.device,
        "clock": clock.kind,
        "repeats": a.repeats,
        "skipped": {k: v for k, v in peers.items() if v},
        "cases": results,
    }
    payload = publish("moe_layer" if dev.type == "cpu" else "moe_layer_cuda", mach, fields, a.out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return payload


if __name__ == "__main__":
    main()

"""One MoE layer, forward + backward: moe-train vs DeepSpeed vs fairscale vs the dense floor.

Same shapes, capacity (factor 1.0: fairscale's Top2Gate hard-codes 2T/E) and expert FFN
(Linear-GELU(tanh)-Linear, no biases) for every contender. The dense floor is one FFN of width
k*d_ff over all tokens: the same expert FLOPs with no routing, no dispatch and no drops.
Contenders are interleaved (rotated order every round) and the median per contender is reported.

DeepSpeed and fairscale need torch.distributed: a 1-process gloo group is created here.
Missing peers (pip install -e .[bench]) are skipped with a note.

    python benchmarks/moe_layer.py            # 8192 tokens, d 512, 16 experts, d_ff 1024
    python benchmarks/moe_layer.py --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    command_line,
    machine,
    machine_line,
    median,
    print_table,
    publish,
    results_dir,
)

from moe_train import MoELayer  # noqa: E402
from moe_train.parallel.launch_env import ensure_single_process_env  # noqa: E402
from moe_train.routing import RouterConfig  # noqa: E402


class FFN(nn.Module):
    """The expert (and the dense floor): Linear -> GELU(tanh) -> Linear, no biases."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.w_in = nn.Linear(d, h, bias=False)
        self.w_out = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x), approximate="tanh"))


def init_single_process_group() -> None:
    if dist.is_initialized():
        return
    ensure_single_process_env()
    dist.init_process_group("gloo", rank=0, world_size=1)


# ---- contenders: each returns a step() closure doing forward + backward ------------------------


def make_ours(kind: str, k: int, T: int, d: int, h: int, E: int, cf: float, groups: int):
    router = {
        "top1": RouterConfig(kind="switch", capacity_factor=cf),
        "top2": RouterConfig(kind="topk", top_k=2, capacity_factor=cf),
        "sam2": RouterConfig(kind="sam", top_k=2, num_groups=groups, capacity_factor=cf),
    }[kind]
    layer = MoELayer(d, h, E, router=router, activation="gelu")
    x = torch.randn(T, d, requires_grad=True)

    def step():
        y, losses = layer(x)
        (y.square().mean() + sum(losses.values())).backward()
        return layer.last_stats.get("dropped_frac", float("nan"))

    return layer, x, step


def make_deepspeed(kind: str, k: int, T: int, d: int, h: int, E: int, cf: float):
    from deepspeed.moe.layer import MoE

    layer = MoE(
        hidden_size=d,
        expert=FFN(d, h),
        num_experts=E,
        ep_size=1,
        k=k,
        capacity_factor=cf,
        eval_capacity_factor=cf,
        min_capacity=0,
        drop_tokens=True,
    )
    x = torch.randn(1, T, d, requires_grad=True)

    def step():
        y, l_aux, _ = layer(x)
        (y.square().mean() + l_aux).backward()
        return float("nan")

    return layer, x, step


class Top1Gate(nn.Module):
    """Switch top-1 in fairscale's gate interface (fairscale 0.4.13 ships only Top2Gate):
    returns (l_aux, combine_weights [S,E,C], dispatch_mask [S,E,C]) built the same einsum way."""

    def __init__(self, d: int, E: int, cf: float):
        super().__init__()
        self.wg = nn.Linear(d, E, bias=False)
        self.cf = cf

    def forward(self, x):
        gates = F.softmax(self.wg(x).float(), dim=1)  # [S, E]
        S, E = gates.shape
        C = math.ceil(S / E * self.cf)
        idx = gates.argmax(dim=1)
        mask = F.one_hot(idx, E).to(gates.dtype)
        loc = torch.cumsum(mask, dim=0) - 1
        l_aux = torch.mean(gates.mean(0) * mask.mean(0)) * E * E
        mask = mask * (loc < C)
        loc_s = (loc * mask).sum(1).long()
        g = (gates * mask).sum(1)  # [S]
        combine = g[:, None, None] * mask[:, :, None] * F.one_hot(loc_s, C).to(gates.dtype)[:, None]
        return l_aux, combine.to(x.dtype), combine.bool()


def make_fairscale(kind: str, k: int, T: int, d: int, h: int, E: int, cf: float):
    from fairscale.nn.moe import MOELayer, Top2Gate

    gate = Top2Gate(d, E) if k == 2 else Top1Gate(d, E, cf)
    layer = MOELayer(gate, nn.ModuleList(FFN(d, h) for _ in range(E)))
    # fairscale wants 3-D input whose first dim is a multiple of the local experts; it flattens it
    x = torch.randn(E, T // E, d, requires_grad=True)

    def step():
        y = layer(x)
        (y.square().mean() + layer.l_aux).backward()
        return float("nan")

    return layer, x, step


def make_dense(kind: str, k: int, T: int, d: int, h: int):
    layer = FFN(d, k * h)
    x = torch.randn(T, d, requires_grad=True)

    def step():
        layer(x).square().mean().backward()
        return 0.0

    return layer, x, step


def peers_available() -> dict[str, str | None]:
    """name -> None if importable, else the reason it is skipped."""
    out: dict[str, str | None] = {}
    for name, mod in (("deepspeed", "deepspeed.moe.layer"), ("fairscale", "fairscale.nn.moe")):
        try:
            __import__(mod)
            out[name] = None
        except Exception as e:  # noqa: BLE001 - any import failure means: skip this peer
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--sam-groups", type=int, default=4, help="SAM device groups (E/G experts each)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--routers", nargs="+", default=["top1", "top2", "sam2"], choices=["top1", "top2", "sam2"]
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 is steadier on a shared machine)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for moe_layer.json (default benchmarks/results/; with --quick results/quick/)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep results of routers not run now from an existing moe_layer.json "
        "with the same shapes (re-measure one router)",
    )
    a = p.parse_args(argv)
    a.out = results_dir(a.out, a.quick)
    if a.quick:
        a.tokens, a.d_model, a.d_ff, a.experts, a.repeats, a.warmup = 512, 64, 128, 8, 3, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    T, d, h, E, cf = a.tokens, a.d_model, a.d_ff, a.experts, a.capacity_factor

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

    mach = machine()
    mach["moe_train_fused_ops"] = ops.extension_available()
    print(machine_line(mach))
    print(
        f"shapes: {T} tokens, d {d}, d_ff {h}, {E} experts, capacity factor {cf}, fp32, "
        f"fused dispatch/combine ops: {mach['moe_train_fused_ops']}"
    )

    torch.manual_seed(0)
    results, rows = {}, []
    for kind in a.routers:
        k = 1 if kind == "top1" else 2
        makers = {"moe-train": partial(make_ours, kind, k, T, d, h, E, cf, a.sam_groups)}
        if kind != "sam2":  # SAM has no peer implementation: compare it with top-2 instead
            if peers.get("deepspeed") is None:
                makers["deepspeed"] = partial(make_deepspeed, kind, k, T, d, h, E, cf)
            if peers.get("fairscale") is None:
                makers["fairscale"] = partial(make_fairscale, kind, k, T, d, h, E, cf)
        makers[f"dense FFN (d_ff {k * h})"] = partial(make_dense, kind, k, T, d, h)
        steps = {name: make()[2] for name, make in makers.items()}
        times: dict[str, list[float]] = {n: [] for n in steps}
        drops: dict[str, float] = {}
        names = list(steps)
        for r in range(a.warmup + a.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
            for n in order:
                t0 = time.perf_counter()
                drops[n] = steps[n]()
                dt = time.perf_counter() - t0
                if r >= a.warmup:
                    times[n].append(dt)
        floor = median(times[names[-1]])
        ours = median(times["moe-train"])
        results[kind] = {}
        for n in names:
            m = median(times[n])
            results[kind][n] = {
                "median_s": m,
                "times_s": times[n],
                "vs_dense": m / floor,
                "vs_moe_train": m / ours,
                "dropped_frac_ours": drops[n],
            }
        del steps
        print(f"  {kind} done", flush=True)
    shapes = {
        "tokens": T,
        "d_model": d,
        "d_ff": h,
        "experts": E,
        "capacity_factor": cf,
        "sam_groups": a.sam_groups,
    }
    runs = {kind: {"machine": mach, "command": command_line()} for kind in results}
    old = a.out / "moe_layer.json"
    if a.merge and old.exists():  # keep the other routers' results of an earlier run
        prev = json.loads(old.read_text())
        if prev.get("shapes") == shapes:
            before = {
                k: {"machine": prev["machine"], "command": prev["command"]} for k in prev["results"]
            }
            runs = {**before, **prev.get("runs", {}), **runs}
            results = {**prev["results"], **results}
    for kind in [k for k in ("top1", "top2", "sam2") if k in results]:
        for n, r in results[kind].items():
            rows.append(
                [
                    kind,
                    n,
                    f"{r['median_s'] * 1e3:.1f}",
                    f"{min(r['times_s']) * 1e3:.1f}",
                    f"{r['vs_dense']:.2f}x",
                    f"{r['vs_moe_train']:.2f}x",
                ]
            )
    if "sam2" in results and "top2" in results:
        s, t = results["sam2"]["moe-train"]["median_s"], results["top2"]["moe-train"]["median_s"]
        rows.append(["sam2 vs top2", "moe-train", "", "", "", f"{s / t:.2f}x of top2"])
    print_table(
        [
            "router",
            "contender",
            "median ms (fwd+bwd)",
            "min ms",
            "time / dense floor",
            "time / moe-train's",
        ],
        rows,
    )
    fields = {
        "shapes": shapes,
        "runs": runs,  # per router: when and how it was measured (differs after --merge)
        "repeats": a.repeats,
        "skipped": {k: v for k, v in peers.items() if v},
        "results": results,
    }
    payload = publish("moe_layer", mach, fields, a.out)
    dist.destroy_process_group()
    return payload


if __name__ == "__main__":
    main()

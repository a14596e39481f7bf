"""Training-state memory per rank at 1, 2 and 4 processes, FSDP off and on.

Each layout runs a few optimizer steps of the native engine on `world` spawned gloo ranks (ep = 2
when there are at least 2 ranks, so dp = world / 2) and reports, per rank, the parameter +
gradient + optimizer-state bytes measured from its tensors (the trainer's `mem/state_bytes`),
the planner's prediction of the same (`state_bytes_per_gpu`), the process's peak RSS and how
far it grew above the RSS before the model was built (runtime, imports, process groups). With
FSDP dense state shrinks as 1/world and expert state as 1/(world/ep); without it every rank holds
the whole dense model and its ep-rank's experts. RSS growth also holds activations and the
transient buffers (FSDP's gathered weights and unsharded gradients of a unit, the optimizer's
temporaries), and the allocator keeps freed memory, so it scales less than the state does.

    python benchmarks/memory.py             # a 42M-parameter MoE (d 512, 8 experts), AdamW
    python benchmarks/memory.py --optim adafactor
    python benchmarks/memory.py --quick     # the tiny model, 1 and 2 ranks, for CI
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, machine, machine_line, parse_args, print_table, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "tiny": {"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4,
             "d_ff": 128, "num_experts": 4, "moe_every": 1},
    "medium": {"vocab_size": 256, "seq_len": 64, "d_model": 512, "n_layers": 4, "n_heads": 8,
               "d_ff": 2048, "num_experts": 8, "moe_every": 2},
}  # fmt: skip


def _config(model: str, world: int, fsdp: bool, optim: str):
    from moe_train.config import TrainConfig
    from moe_train.model import ModelConfig

    cfg = TrainConfig(model=ModelConfig(**MODELS[model]))
    cfg.parallel.ep, cfg.parallel.fsdp, cfg.optim.name = min(2, world), fsdp, optim
    return cfg


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(rank: int, world: int, model: str, fsdp: bool, optim: str, steps: int) -> dict:
    """One rank: a few steps on random tokens; its state bytes and peak RSS."""
    import torch
    import torch.nn.functional as F

    from moe_train.parallel import init_parallel
    from moe_train.routing import RouteKey
    from moe_train.training.build import build_engine

    torch.set_num_threads(1)
    cfg = _config(model, world, fsdp, optim)
    state = init_parallel(cfg.parallel, cfg.model.num_experts, cfg.router)
    baseline = _peak_rss()  # the runtime, imports and process groups: before any model
    engine = build_engine(cfg, state, micro_batch=1, grad_accum=1)
    T, V = cfg.model.seq_len, cfg.model.vocab_size
    for step in range(steps):
        x = torch.randint(0, V, (1, T + 1), generator=torch.Generator().manual_seed(step + rank))
        with engine.micro_batch(last=True):
            logits, aux = engine.model(x[:, :-1], RouteKey(step))
            engine.backward(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + aux)
        engine.step()
    out = {
        "state_bytes": engine.state_bytes(),
        "peak_rss_bytes": _peak_rss(),
        "baseline_rss_bytes": baseline,
    }
    del engine
    state.shutdown()
    return out


def _spawned(rank: int, world: int, port: int, args: tuple, queue) -> None:
    import os

    from moe_train.parallel.launch_env import torchrun_env

    os.environ.update(torchrun_env(rank, world, port))
    queue.put((rank, _rank(rank, world, *args)))


def run_layout(world: int, model: str, fsdp: bool, optim: str, steps: int) -> list[dict]:
    """Per-rank results of one layout on `world` spawned processes."""
    import torch.multiprocessing as mp

    from moe_train.parallel.launch_env import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    args = (model, fsdp, optim, steps)
    procs = [ctx.Process(target=_spawned, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(60)
        if p.exitcode:
            raise RuntimeError(f"rank of {world} exited with {p.exitcode}")
    return [results[r] for r in range(world)]


def predicted(world: int, model: str, fsdp: bool, optim: str) -> int:
    from moe_train.plan import ClusterConfig, PlanOptions, make_plan

    cfg = _config(model, world, fsdp, optim)
    cfg.trainer.global_batch_size = world  # one sequence per rank (state bytes do not depend on it)
    options = PlanOptions(meta_check=False, compare_routers=False, suggest=False)
    return make_plan(cfg, ClusterConfig(world_size=world), options)["state_bytes_per_gpu"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_output_args(ap, "tiny model, 1 and 2 ranks (CI)")
    ap.add_argument("--model", choices=sorted(MODELS), default="medium")
    ap.add_argument("--optim", choices=["adamw", "adafactor"], default="adamw")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    a = parse_args(ap, argv)
    if a.quick:
        a.model, a.worlds, a.steps = "tiny", [1, 2], 2
    mach = machine()
    print(machine_line(mach))
    rows, results = [], []
    for world in a.worlds:
        for fsdp in (False, True):
            per_rank = run_layout(world, a.model, fsdp, a.optim, a.steps)
            state = max(r["state_bytes"] for r in per_rank)
            rss = max(r["peak_rss_bytes"] for r in per_rank)
            grew = max(r["peak_rss_bytes"] - r["baseline_rss_bytes"] for r in per_rank)
            plan = predicted(world, a.model, fsdp, a.optim)
            ep = min(2, world)
            results.append(
                {"world": world, "ep": ep, "fsdp": fsdp, "state_bytes_max": state,
                 "state_bytes_planner": plan, "peak_rss_bytes_max": rss,
                 "peak_rss_above_baseline_bytes_max": grew, "per_rank": per_rank}
            )  # fmt: skip
            rows.append(
                [world, f"{ep}x{world // ep}", fsdp, f"{state / 2**20:.1f}", f"{plan / 2**20:.1f}",
                 f"{state / plan - 1:+.2%}", f"{rss / 2**20:.0f}", f"{grew / 2**20:.0f}"]
            )  # fmt: skip
    print(f"\nmodel {a.model} ({MODELS[a.model]}), optim {a.optim}, {a.steps} steps")
    headers = ["ranks", "ep x dp", "fsdp", "state MiB/rank (max)", "planner MiB", "diff",
               "peak RSS MiB (max)", "RSS growth MiB (max)"]  # fmt: skip
    print_table(headers, rows)
    return publish("memory", mach, {"model": a.model, "optim": a.optim, "results": results}, a.out)


if __name__ == "__main__":
    main()

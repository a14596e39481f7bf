"""Weak scaling of the training app: tokens/s at 1, 2 and 4 processes, same batch per rank, with
the overlap off and on side by side.

Each size runs `moe_train.train.train` under torchrun (gloo, ep = processes, so the experts are
split over the ranks and every MoE layer does a real all-to-all), once per overlap setting:
- off: every chunk of rows goes through the all-to-all (its own too) and nothing overlaps it
  (Dispatcher.overlap = False), expert gradients reduced after backward
  (parallel.overlap_grad_sync=false);
- on (the default): this rank's own rows skip the exchange and are computed while the others
  travel (async all_to_all_single), expert and dense gradients reduced during backward.
Exposed all-to-all time is the time rank 0 spends blocked in all-to-alls: inside a blocking
`all_to_all_single`, or in `wait()` of an async one (the time it was in flight behind compute is
not counted), forward and backward. On a 2-core machine 4 processes oversubscribe the
cores (and 2 processes use them all), so the curve shows overheads, not a cluster's speed-up.

    python benchmarks/scaling.py               # 1, 2, 4 processes, small model, 40 steps
    python benchmarks/scaling.py --quick       # tiny model, 1 and 2 processes, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, machine, machine_line, parse_args, print_table, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def worker(a: argparse.Namespace) -> None:
    """One rank (under torchrun): time all_to_all_single, train, report."""
    import torch.distributed as dist

    from moe_train.config import OptimConfig, TrainConfig, TrainerConfig
    from moe_train.model import ModelConfig
    from moe_train.parallel import ParallelConfig
    from moe_train.routing import RouterConfig
    from moe_train.train import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    from moe_train.dispatch import Dispatcher

    spent = {"s": 0.0, "calls": 0}
    real = dist.all_to_all_single

    class TimedWork:  # an async call's handle: time only the wait (the exposed part)
        def __init__(self, work):
            self.work = work

        def wait(self, *args, **kw):
            t0 = time.perf_counter()
            out = self.work.wait(*args, **kw)
            spent["s"] += time.perf_counter() - t0
            return out

    def timed(*args, **kw):
        t0 = time.perf_counter()
        work = real(*args, **kw)
        spent["s"] += time.perf_counter() - t0
        spent["calls"] += 1
        return TimedWork(work) if kw.get("async_op") and work is not None else work

    dist.all_to_all_single = timed
    on = a.overlap[-1] == "on"  # the worker gets one setting
    Dispatcher.overlap = on
    if a.model == "tiny":
        model = ModelConfig(
            seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, num_experts=4, moe_every=1
        )
    else:
        model = ModelConfig(
            seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff=256, num_experts=8, moe_every=2
        )
    cfg = TrainConfig(
        model=model,
        router=RouterConfig(kind=a.router, top_k=2, num_groups=max(world, 1)),
        parallel=ParallelConfig(ep=world, backend="gloo", overlap_grad_sync=on),
        optim=OptimConfig(warmup_steps=5),
        trainer=TrainerConfig(
            max_steps=a.steps,
            global_batch_size=a.per_rank * world,
            precision="fp32",
            log_every=a.log_every,
            eval_every=10**9,
            eval_batches=0,
            ckpt_every=10**9,
            run_dir=a.run_dir,
            resume=False,
            progress=False,
            tensorboard=False,
        ),
    )
    train(cfg)  # saves one checkpoint at the end: outside the timed windows
    if int(os.environ.get("RANK", "0")) == 0:
        Path(a.run_dir, "a2a.json").write_text(json.dumps(spent))


def run_size(n: int, a: argparse.Namespace, tmp: Path, overlap: str) -> dict:
    run_dir = tmp / f"np{n}-{overlap}"
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(a.threads)  # per rank; launch/train.sh would give cores // n
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        __file__,
        "--worker",
        "--run-dir",
        str(run_dir),
        "--steps",
        str(a.steps),
        "--per-rank",
        str(a.per_rank),
        "--model",
        a.model,
        "--router",
        a.router,
        "--log-every",
        str(a.log_every),
        "--overlap",
        overlap,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise RuntimeError(f"{n} processes failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    recs = [json.loads(s) for s in metrics.open()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][1:]  # skip warm-up window
    tok_s = statistics.median(tps)
    a2a = json.loads((run_dir / "a2a.json").read_text())
    step_s = a.per_rank * n * (128 if a.model == "small" else 64) / tok_s
    a2a_per_step = a2a["s"] / a.steps  # rank 0's exposed all-to-all time per step
    note = "" if proc.returncode == 0 else f"torchrun rc {proc.returncode} at exit"
    return {
        "processes": n,
        "overlap": overlap,
        "tokens_per_s": tok_s,
        "tokens_per_s_per_rank": tok_s / n,
        "step_s": step_s,
        "a2a_s_per_step": a2a_per_step,
        "a2a_calls": a2a["calls"],
        "a2a_share": a2a_per_step / step_s if n > 1 else 0.0,
        "wall_s": wall,
        "note": note,
    }


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--per-rank", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--model", choices=["small", "tiny"], default="small")
    p.add_argument("--router", default="switch")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument(
        "--overlap",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="overlap settings to run side by side (see above)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP threads per rank (1: each rank owns at most a core, so 1 and 2 "
        "processes are a clean weak-scaling pair; 2+ threads per rank thrash when the "
        "machine is busy)",
    )
    add_output_args(p, "tiny model, 1-2 processes, few steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    a = parse_args(p, argv)
    if a.worker:
        worker(a)
        return None
    if a.quick:
        a.procs, a.steps, a.model, a.per_rank, a.log_every = [1, 2], 8, "tiny", 4, 2
    mach = machine()
    print(machine_line(mach))
    print(
        f"weak scaling: {a.model} model, {a.router} router, ep = processes, {a.per_rank} "
        f"sequences per rank per step, {a.steps} steps, gloo, {a.threads} thread(s) per rank"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="moe_scaling_") as tmp:
        for n in a.procs:
            for overlap in a.overlap if n > 1 else a.overlap[-1:]:
                r = run_size(n, a, Path(tmp), overlap)
                results.append(r)
                print(f"  {n} processes, overlap {overlap}: {r['tokens_per_s']:,.0f} tokens/s")
    base = results[0]["tokens_per_s_per_rank"]
    rows = [
        [
            r["processes"],
            r["overlap"] if r["processes"] > 1 else "-",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s_per_rank']:,.0f}",
            f"{r['tokens_per_s_per_rank'] / base:.2f}",
            f"{r['step_s'] * 1e3:.0f}",
            f"{r['a2a_s_per_step'] * 1e3:.1f}",
            f"{100 * r['a2a_share']:.0f}%",
            "; ".join(
                filter(
                    None,
                    ["oversubscribed" if r["processes"] > (os.cpu_count() or 1) else "", r["note"]],
                )
            ),
        ]
        for r in results
    ]
    print_table(
        [
            "processes",
            "overlap",
            "tokens/s",
            "tokens/s per rank",
            "weak-scaling efficiency",
            "step ms",
            "exposed all-to-all ms/step (rank 0)",
            "exposed all-to-all share",
            "note",
        ],
        rows,
    )
    fields = {
        "model": a.model,
        "router": a.router,
        "per_rank_sequences": a.per_rank,
        "steps": a.steps,
        "threads_per_rank": a.threads,
        "results": results,
    }
    return publish("scaling", mach, fields, a.out)


if __name__ == "__main__":
    main()

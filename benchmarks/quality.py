"""The papers' claims in miniature: every router vs dense LMs, same seed, tokens and steps.

Trains the `small` model (4 layers, d 128, MoE every 2nd layer, 8 experts of d_ff 256) on the
embedded default corpus with each router, plus a dense model of the same width (= the active
compute of top-1) and a dense model widened to the active compute of the k=2 routers. Reports final
validation loss (mean +- spread over seeds), tokens/s and active parameters; plots validation loss
curves to PNG.

    python benchmarks/quality.py --seeds 1 2 3 4 --plot docs/quality.png   # docs/RESULTS.md
    python benchmarks/quality.py                 # 2 seeds: ~5 min on 2 idle cores (2 runs at once)
    python benchmarks/quality.py --quick         # seconds, for CI
    python benchmarks/quality.py --resume --seeds 1 2 3   # add a seed, keep the finished runs
    python benchmarks/quality.py --only topk2-dropless topk2-bias fine-shared \
        --baseline topk2-dropless --seeds 1 2 3 4   # balancing and shared/fine-grained experts
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, machine, machine_line, parse_args, publish, table  # noqa: E402

from moe_train.config import OptimConfig, TrainConfig, TrainerConfig  # noqa: E402
from moe_train.model import ModelConfig, MoETransformer  # noqa: E402
from moe_train.routing import RouterConfig  # noqa: E402

BIAS_RATE = 1e-2  # per step; DeepSeek-V3's 1e-3 is for a far longer run than these
# name -> (router config or None for dense, model overrides, paper)
CONTENDERS: dict[str, tuple[RouterConfig | None, dict, str]] = {
    "dense": (None, {"moe_every": 0}, "baseline, = top-1 active compute"),
    "dense-wide": (None, {"moe_every": 0, "d_ff_mult": 1.5}, "= k=2 active compute"),
    "switch": (
        RouterConfig(kind="switch", capacity_factor=1.25, drop_policy="score"),
        {},
        "Switch top-1",
    ),
    "topk2": (
        RouterConfig(kind="topk", top_k=2, capacity_factor=1.25, drop_policy="position"),
        {},
        "GShard top-2",
    ),
    "prototype2": (
        RouterConfig(kind="prototype", top_k=2, capacity_factor=1.25),
        {},
        "M6-T 2 prototypes",
    ),
    "sam2": (
        RouterConfig(kind="sam", top_k=2, num_groups=4, capacity_factor=1.25),
        {},
        "SAM k=2, 4 groups",
    ),
    "expert_choice": (
        RouterConfig(kind="expert_choice", capacity_factor=2.0),
        {},
        "Expert Choice c=2",
    ),
    "tree": (
        RouterConfig(kind="tree", tree_depth=2, capacity_factor=None),
        {},
        "bit-pattern tree, depth 2",
    ),
    # the current generation, dropless: balance loss vs aux-loss-free bias at the same compute,
    # and shared + fine-grained experts at the plain top-2's active (and total) expert width
    "topk2-dropless": (
        RouterConfig(kind="topk", top_k=2, capacity_factor=None, random_routing=False),
        {},
        "top-2 dropless, balance loss 1e-2",
    ),
    "topk2-bias": (
        RouterConfig(
            kind="topk",
            top_k=2,
            capacity_factor=None,
            random_routing=False,
            balance_coef=0.0,
            bias_update_rate=BIAS_RATE,
        ),  # fmt: skip
        {},
        f"top-2 dropless, aux-loss-free bias {BIAS_RATE:g}, no balance loss",
    ),
    "fine-shared": (
        RouterConfig(kind="topk", top_k=6, capacity_factor=None, random_routing=False),
        {"num_experts_mult": 4, "expert_d_ff_div": 4, "shared_experts": 1, "shared_d_ff_div": 2},
        "4x finer experts, top-6 + 1 shared of d_ff/2 (= top-2's active width)",
    ),
}


def experts_per_token(r: RouterConfig | None) -> float:
    if r is None:
        return 0.0
    if r.kind == "expert_choice":
        return float(r.capacity_factor)  # c picks per expert on average = c experts per token
    return float(r.experts_per_token())


def build_cfg(
    name: str,
    seed: int,
    base: ModelConfig,
    steps: int,
    batch: int,
    run_dir: Path,
    eval_every: int,
    eval_batches: int,
    threads: int,
) -> TrainConfig:
    router, over, _ = CONTENDERS[name]
    over = dict(over)
    mult = over.pop("d_ff_mult", None)
    # fine-grained experts: E x m experts of d_ff / m, and shared experts of d_ff / s
    if "num_experts_mult" in over:
        over["num_experts"] = base.num_experts * over.pop("num_experts_mult")
        over["expert_d_ff"] = base.d_ff // over.pop("expert_d_ff_div")
    if "shared_d_ff_div" in over:
        over["shared_d_ff"] = base.d_ff // over.pop("shared_d_ff_div")
    model = replace(base, **over)
    if mult:
        # dense widened so that total FFN FLOPs per token equal the k=2 MoE models': half of the
        # layers are MoE with 2 experts of d_ff active, the other half dense d_ff -> 1.5 d_ff
        model = replace(model, d_ff=int(base.d_ff * mult))
    return TrainConfig(
        model=model,
        router=router or RouterConfig(),
        optim=OptimConfig(warmup_steps=max(1, steps // 10)),
        trainer=TrainerConfig(
            max_steps=steps,
            global_batch_size=batch,
            precision="fp32",
            log_every=max(1, steps // 20),
            eval_every=eval_every,
            eval_batches=eval_batches,
            ckpt_every=10**9,
            run_dir=str(run_dir),
            resume=False,
            progress=False,
            tensorboard=False,
            threads=threads,
        ),
        seed=seed,
    )


def active_params(cfg: TrainConfig) -> tuple[int, int]:
    """(total params, params a token touches): experts counted k (or c) times out of E."""
    m = MoETransformer(replace(cfg.model), cfg.router)
    n = m.num_params()
    k = experts_per_token(cfg.router) if cfg.model.moe_every else 0
    per_expert = sum(
        (layer.experts.w_in[0].numel() + layer.experts.w_out[0].numel()) for layer in m.moe_layers()
    )
    return n["total"], int(n["dense"] + k * per_expert)


def run_one(cfg: TrainConfig, quiet: bool) -> dict:
    """Train one model in this process (a pool worker) and read its metrics back."""
    import torch

    from moe_train.train import train

    torch.set_num_threads(cfg.trainer.threads or torch.get_num_threads())
    t0 = time.perf_counter()
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        train(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(s) for s in (Path(cfg.trainer.run_dir) / "metrics.jsonl").open()]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    tps = tps[1:] or tps  # the first window includes warm-up (kernel build, allocator)
    return {
        "val_curve": val,
        "final_val_loss": val[-1][1],
        "final_train_loss": [r["loss"] for r in recs if "loss" in r][-1],
        "tokens_per_s": statistics.median(tps),
        "wall_s": wall,
        # expert load CV (std / mean of the slots per expert), mean over MoE layers, per step
        "load_cv": [
            (r["step"], statistics.mean(v for k, v in r.items() if k.endswith("/load_cv")))
            for r in recs
            if any(k.endswith("/load_cv") for k in r)
        ],
        # fraction of slots dropped by capacity, mean over MoE layers, per logged step
        "dropped_frac": [
            (r["step"], statistics.mean(v for k, v in r.items() if k.endswith("/dropped_frac")))
            for r in recs
            if any(k.endswith("/dropped_frac") for k in r)
        ],
    }


def plot(results: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install -e .[bench]); no plot")
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        steps = [s for s, _ in runs[0]["val_curve"]]
        mean = [statistics.mean(r["val_curve"][i][1] for r in runs) for i in range(len(steps))]
        style = "--" if name.startswith("dense") else "-"
        (line,) = ax.plot(steps, mean, style, label=name, marker=".")
        if len(runs) > 1:
            lo = [min(r["val_curve"][i][1] for r in runs) for i in range(len(steps))]
            hi = [max(r["val_curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title)
    all_final = [r["final_val_loss"] for runs in results.values() for r in runs]
    ax.set_ylim(min(all_final) - 0.1, min(all_final) + 1.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="subset of contenders")
    p.add_argument(
        "--baseline",
        default="dense",
        choices=list(CONTENDERS),
        help="the contender the others are compared with, paired by seed (default dense)",
    )
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default results/quality.png)")
    add_output_args(p, "tiny model, few steps, one seed (CI)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1 is fastest for this size, and robust when the "
        "machine is shared)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished runs of the same setting from <out>/quality_runs.jsonl",
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="with --resume: no new runs, summarise what the log holds",
    )
    p.add_argument("--verbose", action="store_true", help="show the training app's output")
    a = parse_args(p, argv)

    if a.quick:
        base = ModelConfig(
            seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=8, moe_every=2
        )
        steps, seeds, batch, eval_every, eval_batches = 6, [1], 4, 3, 1
    else:
        base = ModelConfig(
            seq_len=128, d_model=128, n_layers=4, n_heads=4, d_ff=256, num_experts=8, moe_every=2
        )
        steps, seeds, batch = a.steps, a.seeds, a.batch
        eval_every, eval_batches = max(1, steps // 12), 8
    names = a.only or list(CONTENDERS)
    mach = machine()
    print(machine_line(mach))
    print(f"model: {base}\nsteps {steps}, batch {batch}x{base.seq_len} tokens, seeds {seeds}")

    tmp = Path(tempfile.mkdtemp(prefix="moe_quality_"))
    results: dict[str, list[dict]] = {n: [] for n in names}
    meta: dict[str, dict] = {}
    jobs = []  # seeds outer, contenders inner: slow drift hits every contender alike
    for seed in seeds:
        for name in names:
            cfg = build_cfg(
                name,
                seed,
                base,
                steps,
                batch,
                tmp / f"{name}-{seed}",
                eval_every,
                eval_batches,
                a.threads,
            )
            jobs.append((name, seed, cfg))
            if name not in meta:
                total, active = active_params(cfg)
                meta[name] = {
                    "params": total,
                    "active_params": active,
                    "what": CONTENDERS[name][2],
                    "d_ff": cfg.model.d_ff,
                    "router": None if name.startswith("dense") else cfg.router.__dict__,
                }
    # every finished run is appended to a log, so an interrupted sweep keeps its runs (--resume)
    log = a.out / "quality_runs.jsonl"
    key = json.dumps({"model": base.__dict__, "steps": steps, "batch": batch}, sort_keys=True)
    done: dict[tuple[str, int], dict] = {}
    if a.resume and log.exists():
        for line in log.open():
            r = json.loads(line)
            if r.get("key") == key:
                done[(r["name"], r["seed"])] = r["result"]
    elif log.exists():
        log.unlink()
    todo = [(n, s_, c) for n, s_, c in jobs if (n, s_) not in done and not a.summarize_only]
    if done:
        print(f"resuming: {len(done)} runs from {log}, {len(todo)} to go")
    a.out.mkdir(parents=True, exist_ok=True)
    pool = ProcessPoolExecutor(
        max_workers=max(1, a.jobs), mp_context=multiprocessing.get_context("spawn")
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the finally kills workers
    try:
        futs = {pool.submit(run_one, cfg, not a.verbose): (n, s_) for n, s_, cfg in todo}
        for fut in as_completed(futs):
            (name, seed), r = futs[fut], fut.result()
            done[(name, seed)] = r
            with log.open("a") as f:
                f.write(json.dumps({"key": key, "name": name, "seed": seed, "result": r}) + "\n")
            print(
                f"  seed {seed} {name:14s} val {r['final_val_loss']:.4f}  "
                f"{r['tokens_per_s']:,.0f} tok/s  {r['wall_s']:.0f}s",
                flush=True,
            )
    finally:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()  # do not leave orphaned training runs behind on interrupt
        pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    for name, seed, _ in jobs:
        if (name, seed) in done:
            results[name].append({"seed": seed, **done[(name, seed)]})
    missing = [f"{n}/{s_}" for n, s_, _ in jobs if (n, s_) not in done]
    if missing:
        print(f"note: {len(missing)} runs missing (summarising the rest): {', '.join(missing)}")
    names = [n for n in names if results[n]]

    rows, summary = [], {}
    # paired by seed (same data order, same dense init): the spread of the difference is what
    # says whether a gap is real, not the spread of each contender alone
    dense_by_seed = {r["seed"]: r["final_val_loss"] for r in results.get(a.baseline, [])}

    def paired(name: str) -> tuple[float, float, int, int] | None:
        diffs = [
            r["final_val_loss"] - dense_by_seed[r["seed"]]
            for r in results[name]
            if r["seed"] in dense_by_seed
        ]
        if not diffs or name == a.baseline:
            return None
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        return statistics.mean(diffs), sd, sum(d < 0 for d in diffs), len(diffs)

    for name in names:
        runs = results[name]
        vals = [r["final_val_loss"] for r in runs]
        seeds_done = [r["seed"] for r in runs]
        mean = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        cvs = [statistics.mean(v for _, v in r["load_cv"]) for r in runs if r.get("load_cv")]
        s = {
            **meta[name],
            "val_mean": mean,
            "val_std": sd,
            "val_min": min(vals),
            "val_max": max(vals),
            "tokens_per_s": tps,
            "seeds": seeds_done,
            "vs_baseline_paired": paired(name),
            # load CV averaged over the logged steps, then mean and sd over seeds
            "load_cv_mean": statistics.mean(cvs) if cvs else None,
            "load_cv_std": statistics.stdev(cvs) if len(cvs) > 1 else 0.0,
        }
        summary[name] = s
        rows.append(
            [
                name,
                meta[name]["what"],
                f"{mean:.4f} ± {sd:.4f} (n={len(vals)})",
                ""
                if s["vs_baseline_paired"] is None
                else "{:+.4f} ± {:.4f} ({}/{} seeds better)".format(*s["vs_baseline_paired"]),
                "" if not cvs else f"{s['load_cv_mean']:.3f} ± {s['load_cv_std']:.3f}",
                f"{tps:,.0f}",
                f"{meta[name]['params'] / 1e6:.2f}M",
                f"{meta[name]['active_params'] / 1e6:.2f}M",
            ]
        )
    print()
    print(
        table(
            [
                "model",
                "what",
                "final val loss (mean ± sd over seeds)",
                f"vs {a.baseline} (paired by seed, mean ± sd)",
                "load CV over training (mean ± sd)",
                "tokens/s (median)",
                "params",
                "active params",
            ],
            rows,
        )
    )

    plot_path = a.plot or (a.out / "quality.png")
    title = (
        f"small LM, default corpus, {steps} steps x {batch * base.seq_len} tokens; "
        f"mean of {len(seeds)} seeds, band = min..max"
    )
    plotted = plot(results, plot_path, title)
    fields = {
        "model": base.__dict__,
        "steps": steps,
        "jobs": a.jobs,
        "threads_per_run": a.threads,
        "batch": batch,
        "seeds": seeds,
        "baseline": a.baseline,
        "summary": summary,
        "runs": results,
        "plot": str(plot_path) if plotted else None,
    }
    return publish("quality", mach, fields, a.out)


if __name__ == "__main__":
    main()

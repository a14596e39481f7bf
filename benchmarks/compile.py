"""torch.compile per Transformer block (trainer.compile=blocks) vs eager: training tokens/s.

For each model config (configs/model/<name>.yaml; default: `small`, the trainer's default, and
`base`) and the default router (configs/router/switch.yaml), one process trains on random tokens
with AdamW, forward + backward + step, eager and compiled side by side in one run (rounds
interleaved, so a busy machine slows both alike). Compile time is the first compiled step's
time minus a steady eager step (dynamo + inductor, and the recompiles of the first steps). The
first steps' losses of the two runs are compared (the same seed: they should agree to ~1e-5).

    python benchmarks/compile.py                     # small and base on CPU
    python benchmarks/compile.py --device cuda --models base
    python benchmarks/compile.py --quick             # tiny model, a few steps, for CI
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_args,
    gpu_missing,
    machine,
    machine_line,
    parse_args,
    print_table,
    publish,
)

REPO = Path(__file__).resolve().parents[1]


def model_config(name: str, seq_len: int | None):
    import yaml

    from moe_train.model import ModelConfig

    fields = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    fields["vocab_size"] = fields.get("vocab_size") or 256  # the planner's default vocabulary
    if seq_len:
        fields["seq_len"] = seq_len
    return ModelConfig(**fields)


def router_config():
    import yaml

    from moe_train.routing import RouterConfig

    return RouterConfig(**yaml.safe_load((REPO / "configs/router/switch.yaml").read_text()))


def build(name: str, a: argparse.Namespace, compiled: bool):
    from moe_train.model import MoETransformer
    from moe_train.parallel import ParallelConfig, ParallelDims, ProcessGroups, parallelize

    cfg = model_config(name, a.seq_len)
    torch.manual_seed(0)
    model = MoETransformer(cfg, router_config(), seed=0).to(a.device)
    parallelize(
        model,
        ParallelDims(),
        ProcessGroups(),
        ParallelConfig(),
        compile="blocks" if compiled else "none",
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return cfg, model, opt


def step(model, opt, cfg, a: argparse.Namespace, i: int) -> tuple[float, float]:
    """One training step on the batch of step i: (seconds, loss)."""
    from moe_train.ops.hashing import mix_seed
    from moe_train.routing import RouteKey

    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, cfg.seq_len + 1), generator=g)
    tokens = tokens.to(a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    # a new noise seed and token offset every step, as the train step makes them: the compiled
    # blocks take the seed as a tensor (no recompile), the offset as a dynamic size (one)
    key = RouteKey(mix_seed(7, i), i * tokens.shape[0] * cfg.seq_len)
    with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.bf16):
        logits, aux = model(tokens[:, :-1], key)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + aux
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0, float(loss.detach())


def measure(name: str, a: argparse.Namespace) -> dict:
    runs = {mode: build(name, a, mode == "compiled") for mode in ("eager", "compiled")}
    cfg = runs["eager"][0]
    times: dict[str, list[float]] = {m: [] for m in runs}
    losses: dict[str, list[float]] = {m: [] for m in runs}
    first: dict[str, float] = {}
    for i in range(a.warmup + a.steps):
        for mode, (_, model, opt) in runs.items():  # interleaved: same load on both
            dt, loss = step(model, opt, cfg, a, i)
            losses[mode].append(loss)
            if i == 0:
                first[mode] = dt
            if i >= a.warmup:
                times[mode].append(dt)
    tokens = a.batch * cfg.seq_len
    out: dict = {"model": name, "tokens_per_step": tokens, "seq_len": cfg.seq_len}
    for mode in runs:
        med = statistics.median(times[mode])
        out[mode] = {"step_s": med, "tokens_per_s": tokens / med, "first_step_s": first[mode]}
    out["compile_s"] = first["compiled"] - out["eager"]["step_s"]
    out["speedup"] = out["eager"]["step_s"] / out["compiled"]["step_s"]
    out["loss_max_rel_diff"] = max(
        abs(x - y) / abs(y) for x, y in zip(losses["compiled"], losses["eager"])
    )
    out["losses"] = losses
    return out


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "base"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed (compiles happen here)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="override the config's seq_len")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU's training dtype)")
    add_output_args(p, "the tiny model, a few steps")
    a = parse_args(p, argv)
    if gpu_missing(a.device):
        return None
    if a.quick:
        a.models, a.steps, a.warmup, a.batch = ["tiny"], 3, 2, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    mach = machine(a.device)
    print(machine_line(mach))
    print(
        f"trainer.compile=blocks vs none: {', '.join(a.models)}, switch router, batch {a.batch}, "
        f"{a.warmup} warm-up + {a.steps} timed steps each, {a.device}, "
        f"{'bf16 autocast' if a.bf16 else 'fp32'}"
    )
    results = []
    for name in a.models:
        r = measure(name, a)
        results.append(r)
        print(f"  {name}: {r['speedup']:.2f}x, compile {r['compile_s']:.1f} s", flush=True)
    rows = [
        [
            r["model"],
            r["tokens_per_step"],
            f"{r['eager']['tokens_per_s']:,.0f}",
            f"{r['compiled']['tokens_per_s']:,.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['compile_s']:.1f}",
            f"{r['loss_max_rel_diff']:.1e}",
        ]
        for r in results
    ]
    print_table(
        [
            "model",
            "tokens/step",
            "eager tokens/s",
            "compiled tokens/s",
            "compiled / eager",
            "compile s",
            "loss max rel diff",
        ],
        rows,
    )
    fields = {
        "device": a.device,
        "bf16": a.bf16,
        "batch": a.batch,
        "steps": a.steps,
        "results": results,
    }
    return publish("compile" if a.device == "cpu" else f"compile_{a.device}", mach, fields, a.out)


if __name__ == "__main__":
    main()

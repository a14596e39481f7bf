"""Document masking (data.document_mask) vs plain causal attention, side by side in one run.

Two tables:
1. training tokens/s of the default model on the default corpus, the same steps with and without
   the mask (the engines built alike, their steps interleaved so that a shared machine slows both
   alike); masked/unmasked is the figure. The loader's share (positions included) is timed too.
2. the attention op alone at that model's shape: SDPA is_causal=True, SDPA with the [B, 1, T, T]
   bool mask, and with --flex torch's flex_attention with a BlockMask (compiled; eager flex is a
   reference implementation), forward, and forward + backward where the op has a backward
   (flex_attention has none on CPU in torch 2.13, so CPU training cannot use it).

    python benchmarks/document_mask.py            # model=small, 6 timed steps
    python benchmarks/document_mask.py --flex     # also flex_attention (compiles: ~30 s on CPU)
    python benchmarks/document_mask.py --quick    # model=tiny, CI-sized
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import (
    add_output_args,
    machine,
    machine_line,
    median,
    parse_args,
    print_table,
    publish,
)


def compose_cfg(model: str, masked: bool, corpus_bytes: int | None):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_train.config import CONFIG_DIR, register_configs

    register_configs()
    overrides = [f"model={model}", "trainer.precision=fp32", f"data.document_mask={masked}"]
    if corpus_bytes:
        overrides.append(f"data.default_corpus_bytes={corpus_bytes}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def training_rows(model: str, steps: int, corpus_bytes: int | None) -> dict:
    """Median step time and tokens/s, masked and not, interleaved step by step."""
    from moe_train.parallel import ParallelState
    from moe_train.training.batches import BatchPlan
    from moe_train.training.build import build_engine, open_training_data
    from moe_train.training.step import train_step

    runs = {}
    for masked in (False, True):
        cfg = compose_cfg(model, masked, corpus_bytes)
        data = open_training_data(cfg)
        parallel = ParallelState(cfg.parallel)
        B, T = cfg.trainer.global_batch_size, cfg.model.seq_len
        micro, accum = cfg.trainer.batch_split(1)
        engine = build_engine(cfg, parallel, micro, accum)
        plan = BatchPlan(cfg.seed, B, T, micro, accum, 0, 1, parallel.device, masked)
        runs[masked] = (engine, data, plan, {"step": [], "load": []})
    for step in range(steps + 1):  # step 0: warm-up, not counted
        for engine, data, plan, times in runs.values():
            t0 = time.perf_counter()
            list(plan.micro_batches(data, step))  # what train_step reads: its loader share
            t1 = time.perf_counter()
            train_step(engine, data, plan, step, 1e-4, rank=0)
            if step:
                times["load"].append(t1 - t0)
                times["step"].append(time.perf_counter() - t1)
    out: dict = {"docs_per_window": docs_per_window(runs[True][1], runs[True][2], steps)}
    for masked, (_, _, plan, times) in runs.items():
        step_s = median(times["step"])
        out["masked" if masked else "unmasked"] = {
            "step_ms": 1e3 * step_s,
            "loader_ms": 1e3 * median(times["load"]),
            "tokens_per_s": plan.global_batch * plan.seq_len / step_s,
        }
    out["masked_vs_unmasked"] = out["masked"]["tokens_per_s"] / out["unmasked"]["tokens_per_s"]
    out.update(model=model, global_batch=plan.global_batch, seq_len=plan.seq_len, steps=steps)
    return out


def docs_per_window(data, plan, steps: int) -> float:
    """Mean documents (pieces) per window over the timed steps' batches."""
    sampler = plan.sampler(data)
    starts = [(sampler.positions(s) == 0).sum(-1).float().mean() for s in range(1, steps + 1)]
    return float(torch.stack(starts).mean())


def attention_rows(model: str, batch: int, reps: int, flex: bool) -> dict:
    """ms of one attention call, forward + backward, at the model's shape."""
    from moe_train.model.attention import document_causal_mask

    cfg = compose_cfg(model, True, None).model
    B, T, h, dh = batch, cfg.seq_len, cfg.n_heads, cfg.head_width
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, dh, generator=g, requires_grad=True) for _ in range(3))
    lengths = torch.randint(T // 8, T, (B, 8), generator=g)  # documents of T/8..T tokens
    pos = torch.stack([torch.cat([torch.arange(n) for n in row])[:T] for row in lengths.tolist()])
    mask = document_causal_mask(pos)
    calls = {
        "SDPA is_causal=True (unmasked)": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True
        ),
        "SDPA bool mask [B,1,T,T]": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    }
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = (pos == 0).cumsum(-1)

        def same_doc(b, _h, qi, ki):
            return (doc[b, qi] == doc[b, ki]) & (ki <= qi)

        block = create_block_mask(same_doc, B, None, T, T, device="cpu")
        compiled = torch.compile(flex_attention)
        qd, kd, vd = (t.detach() for t in (q, k, v))  # on CPU flex refuses inputs with grad
        flex_call = lambda: compiled(qd, kd, vd, block_mask=block)  # noqa: E731
        calls["flex_attention BlockMask (compiled)"] = flex_call
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = {}
    for name, call in calls.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            y = call()
            first = time.perf_counter() - t0
            forward = [_timed(call) for _ in range(reps)]
        err = float((y - ref).abs().max()) if "unmasked" not in name else None
        backward = None  # flex_attention has no backward on CPU (torch 2.13)
        if "flex" not in name or q.is_cuda:
            step = lambda c=call: c().sum().backward()  # noqa: E731
            backward = 1e3 * median([_timed(step) for _ in range(reps)])
        out[name] = {"forward_ms": 1e3 * median(forward), "forward_backward_ms": backward,
                     "first_call_s": first, "max_abs_vs_sdpa_mask": err}  # fmt: skip
    return {"shape": [B, h, T, dh], "calls": out}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_output_args(p, "model=tiny, 2 steps, small corpus (CI)")
    p.add_argument("--model", default="small", help="model config (default: small, the default)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    p.add_argument("--flex", action="store_true", help="also time flex_attention (compiles)")
    a = parse_args(p, argv)
    corpus_bytes = None
    if a.quick:
        a.model, a.steps, corpus_bytes = "tiny", 2, 400_000
    mach = machine()
    print(machine_line(mach))
    train = training_rows(a.model, a.steps, corpus_bytes)
    print(f"\ntraining, model={a.model}: global batch {train['global_batch']} x seq_len "
          f"{train['seq_len']}, {train['docs_per_window']:.2f} documents per window, "
          f"median of {a.steps} steps")  # fmt: skip
    print_table(
        ["attention", "step ms", "tokens/s", "loader ms", "vs unmasked"],
        [
            [
                name,
                r["step_ms"],
                r["tokens_per_s"],
                r["loader_ms"],
                r["tokens_per_s"] / train["unmasked"]["tokens_per_s"],
            ]
            for name, r in ((n, train[n]) for n in ("unmasked", "masked"))
        ],  # fmt: skip
    )
    attn = attention_rows(a.model, train["global_batch"], 3 if a.quick else 10, a.flex)
    base = attn["calls"]["SDPA is_causal=True (unmasked)"]
    print(f"\nattention alone, [B, h, T, dh] = {attn['shape']}, documents of T/8..T tokens")
    print_table(
        ["call", "forward ms", "vs is_causal", "fwd + bwd ms", "vs is_causal", "first call s",
         "max |diff| vs SDPA mask"],
        [
            [n, r["forward_ms"], r["forward_ms"] / base["forward_ms"],
             "no backward on CPU" if r["forward_backward_ms"] is None else r["forward_backward_ms"],
             "-" if r["forward_backward_ms"] is None
             else r["forward_backward_ms"] / base["forward_backward_ms"],
             r["first_call_s"], "-" if r["max_abs_vs_sdpa_mask"] is None
             else r["max_abs_vs_sdpa_mask"]]
            for n, r in attn["calls"].items()
        ],
    )  # fmt: skip
    return publish("document_mask", mach, {"training": train, "attention": attn}, a.out)


if __name__ == "__main__":
    main()

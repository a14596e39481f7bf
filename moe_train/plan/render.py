"""The plan as console tables."""

from __future__ import annotations

from typing import Any

from .config import GiB


def format_count(x: float) -> str:
    """1234567 -> '1.235M' (K, M, B, T)."""
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.3f}{unit}"
    return f"{x:.0f}"


def format_bytes(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


def format_seconds(x: float) -> str:
    return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A titled text table: first column left-aligned, the others right-aligned."""
    cols = [header, *rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))

    return "\n".join([title, fmt(header), "  ".join("-" * x for x in w), *map(fmt, rows), ""])


def _headline(plan: dict[str, Any], names: dict[str, str]) -> str:
    c, o, b = plan["cluster"], plan["trainer_options"], plan["batch"]
    chosen = " (the largest: no parallel.ep given)" if plan.get("ep_chosen_by_planner") else ""
    return (
        f"moe-train-plan  model={names.get('model', '?')}  router={names.get('router', '?')}  "
        f"architecture={plan['architecture']}  world={c['world_size']}  "
        f"ep={o['parallel.ep']}{chosen}  dp(expert)={plan['dp_expert']}  "
        f"fsdp={o['parallel.fsdp']}  batch={b['global_batch_size']} = {c['world_size']} GPUs x "
        f"micro {b['micro_batch_size']} x accum {b['grad_accum']} (x{b['seq_len']} tokens)  "
        f"ckpt={o['trainer.activation_checkpointing']}  optim={o['optim.name']}\n"
    )


def _hardware(plan: dict[str, Any]) -> str:
    """What the plan assumes of the machine: GPU, memory, peak and achieved FLOP/s, links."""
    from ..hardware import peak_tflops

    c = plan["cluster"]
    peak = peak_tflops(c["gpu"])
    peak_text = f"peak {peak:g} TFLOP/s dense bf16/fp16" if peak else "peak unknown"
    return (
        f"hardware: {c['gpu']}, {c['gpus_per_node']} per node, {c['gpu_memory_gb']:g} GiB each "
        f"({c['reserved_gb']:g} reserved), {peak_text}, {c['tflops']:g} TFLOP/s achieved "
        f"assumed; links per GPU per direction: {c['intra_node_gbps']:g} GB/s in a node, "
        f"{c['inter_node_gbps']:g} GB/s across nodes\n"
    )


def _params(plan: dict[str, Any]) -> str:
    p, n = plan["params"], format_count
    expert = (
        f"expert ({p['moe_layers']} MoE layers x {p['experts_per_layer']} x "
        f"{n(p['expert_size'])}, k={p['experts_per_token']:g})"
    )
    rows = [
        [
            "dense (emb, attn, norms, dense FFN, routers"
            + (f", shared experts {n(p['shared'])})" if p.get("shared") else ")"),
            n(p["dense"]),
            n(p["active_dense"]),
            n(p["dense_per_gpu"]),
        ],
        [expert, n(p["experts"]), n(p["active_expert"]), n(p["expert_per_gpu"])],
        ["total", n(plan["total_params"]), n(plan["active_params"]), n(plan["params_per_gpu"])],
    ]
    return table("Parameters", ["", "total", "active/token", "per GPU"], rows)


def _meta_check(plan: dict[str, Any]) -> str:
    mc, ep = plan["meta_check"], plan["trainer_options"]["parallel.ep"]
    verdict = "matches" if mc["match"] else "MISMATCH"
    return (
        f"meta-device check (decoder-only module, rank 0 of ep={ep}): dense "
        f"{format_count(mc['dense'])}, expert {format_count(mc['expert'])} -> {verdict} the "
        f"analytic count ({mc['seconds']:.2f} s)\n"
    )


def _memory(plan: dict[str, Any]) -> str:
    m, b = plan["memory"], format_bytes
    terms = ("weights", "gradients", "optimizer", "transient_weights_and_gradients")
    rows = [[k.replace("_", " "), b(m[k])] for k in (*terms, "activations", "reserved")]
    rows += [
        ["  state (weights + gradients + optimizer), exact", b(plan["state_bytes_per_gpu"])],
        ["  activations without checkpointing", b(m["activations_no_checkpointing"])],
        ["  activations with moe checkpointing", b(m["activations_moe_checkpointing"])],
        ["  activations with full checkpointing", b(m["activations_checkpointing"])],
        ["total", b(m["total"])],
        ["GPU memory", b(m["capacity"])],
        [
            "fits" if m["fits"] else "DOES NOT FIT",
            ("spare " if m["fits"] else "short by ") + b(abs(m["margin"])),
        ],
    ]
    return table("Memory per GPU", ["", "bytes"], rows)


def _step(plan: dict[str, Any]) -> str:
    a, f, g = plan["a2a"], plan["compute"], plan["grad_sync"]
    b, t = format_bytes, format_seconds
    rows = [
        ["tokens per step (global)", format_count(f["tokens_per_step"])],
        ["FLOPs per GPU", format_count(f["flops_per_gpu_per_step"])],
        ["compute time", t(f["seconds"])],
        ["all-to-all: distinct ranks per token", f"{a['distinct_ranks_per_token']:.3f}"],
        ["all-to-all bytes sent", b(a["bytes_per_gpu_per_step"])],
        ["all-to-all intra-node share", f"{a['intra_node_share']:.1%}"],
        ["all-to-all time", t(a["seconds"])],
        ["comm / compute", f"{plan['comm_compute_ratio']:.2f}"],
        ["grad sync bytes (dense + expert, overlappable)", b(g["dense_bytes"] + g["expert_bytes"])],
        ["grad sync time", t(g["seconds"])],
    ]
    return table("Per optimizer step, per GPU", ["", "value"], rows)


def _routers(plan: dict[str, Any]) -> str:
    header = ["router", "k", "active", "ranks/token", "a2a bytes", "a2a time", "compute"]
    rows = [
        [
            r["router"],
            f"{r['experts_per_token']:g}",
            format_count(r["active_params"]),
            f"{r['distinct_ranks_per_token']:.2f}",
            format_bytes(r["a2a_bytes_per_gpu_per_step"]),
            format_seconds(r["a2a_seconds"]),
            format_seconds(r["compute_seconds"]),
            f"{r['comm_compute_ratio']:.2f}",
        ]
        for r in plan["routers"]
    ]
    return table("Routers on this layout", [*header, "comm/compute"], rows)


def _changes(suggestion: dict[str, Any]) -> str:
    return " ".join(suggestion["options"])


def _suggestion(plan: dict[str, Any]) -> list[str]:
    s = plan["suggestion"]
    c, optim = plan["cluster"], plan["trainer_options"]["optim.name"]
    if s is None:
        return [
            f"No layout up to 64x the GPUs fits with optim={optim} (FSDP, every ep, "
            "activation checkpointing and micro batch searched): the state alone needs "
            f"{format_bytes(plan['state_bytes_per_gpu'])} per GPU; shrink the model or use "
            "another optimizer (optim=adafactor).\n"
        ]
    out = []
    if s["cluster"]["world_size"] > c["world_size"]:
        out.append(
            f"With optim={optim} no layout fits on {c['world_size']} GPUs (every ep, "
            "FSDP, activation checkpointing and micro batch searched): fp32 weights, gradients "
            f"and optimizer state alone take {format_bytes(plan['state_floor_bytes_per_gpu'])} "
            "per GPU however they are sharded."
        )
    out += [
        "Trainer options that fit (moe-train overrides; cluster.world_size is the GPUs to launch):",
        f"  {_changes(s)}  ({format_bytes(s['memory_per_gpu_bytes'])} per GPU, "
        f"step ~{format_seconds(s['step_seconds'])})",
    ]
    out += ["  or: " + _changes(alt) for alt in plan["suggestions"][1:]]
    same = plan.get("suggestion_same_gpus")
    if same:
        out.append(
            f"On the {c['world_size']} GPUs you have: {_changes(same)}  "
            f"({format_bytes(same['memory_per_gpu_bytes'])} per GPU)"
        )
    elif s["cluster"]["world_size"] > c["world_size"]:
        out.append(f"Nothing fits on the {c['world_size']} GPUs you have with any optimizer.")
    return [*out, ""]


def _not_modelled(plan: dict[str, Any]) -> str:
    return "Not modelled: " + "; ".join(plan["not_modelled"]) + ".\n"


def render(plan: dict[str, Any], names: dict[str, str]) -> str:
    """The plan as text: headline, parameters, meta check, memory, step costs, routers, fixes."""
    out = [_headline(plan, names) + _hardware(plan), _params(plan)]
    if "meta_check" in plan:
        out.append(_meta_check(plan))
    out += [_memory(plan), _step(plan)]
    if "routers" in plan:
        out.append(_routers(plan))
    if not plan["memory"]["fits"] and "suggestion" in plan:
        out += _suggestion(plan)
    if "not_modelled" in plan:
        out.append(_not_modelled(plan))
    return "\n".join(out)

"""All-to-all volume per token of one MoE layer, for every router, on 4 gloo ranks (ep = 4).

Counters come from the layer itself (`layer.last_stats`, summed over ranks); the analytic value is
tokens x d x bytes x (distinct destination ranks per token), the distinct ranks counted from the
router's own Assignment. The nominal column is what the routing rule implies for uniform routing,
as the router class states it (`expected_ranks`, the planner's number): Switch and SAM send a token
to exactly one rank whatever k is; top-2 to 2 - (E/ep - 1)/(E - 1) on average; M6-T prototypes
(each spanning whole ranks) to exactly k; expert choice to ep (1 - (1 - c/E)^(E/ep)).

    python benchmarks/comm_volume.py            # 4 ranks x 4096 tokens, d 512, 16 experts
    python benchmarks/comm_volume.py --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_output_args, machine, machine_line, parse_args, print_table, publish  # noqa: E402

from moe_train.parallel.launch_env import free_port, torchrun_env  # noqa: E402
from moe_train.routing import RouterConfig, router_class  # noqa: E402

ROUTERS = {
    "switch": dict(kind="switch"),
    "topk2": dict(kind="topk", top_k=2),
    "prototype2": dict(kind="prototype", top_k=2),
    "sam2": dict(kind="sam", top_k=2),  # fitted to ep: one group of E/ep experts per rank
    "expert_choice": dict(kind="expert_choice", capacity_factor=2.0),
    "tree": dict(kind="tree", tree_depth=2),
}
COUNTERS = ("dispatch_rows", "dispatch_bytes", "token_bytes", "send_bytes", "recv_bytes")


def router_for(kw: dict, experts: int, ep: int, capacity_factor: float | None) -> RouterConfig:
    """The benchmark's router, with the fields its class needs for `ep` ranks (SAM's groups)."""
    kw = {"capacity_factor": capacity_factor, **kw}
    cfg = RouterConfig(**kw)
    cls = router_class(cfg.kind)
    return RouterConfig(**kw, **cls.layout_fields(cfg, cls.num_experts_for(cfg, experts), ep))


def nominal_ranks(router: RouterConfig, E: int, ep: int) -> float:
    """Expected destination ranks per token under uniform routing (the router class's formula)."""
    return router_class(router.kind).expected_ranks(router, E, ep)


def _rank(rank: int, world: int, port: int, args: dict, queue) -> None:
    os.environ.update(torchrun_env(rank, world, port))
    torch.set_num_threads(1)
    from moe_train import MoELayer
    from moe_train.parallel import ParallelConfig, init_parallel
    from moe_train.parallel.parallelize import connect_process_groups

    T, d, h, E = args["tokens"], args["d_model"], args["d_ff"], args["experts"]
    out = {}
    state = None
    for name, kw in ROUTERS.items():
        router = router_for(kw, E, world, args["capacity_factor"])
        n_exp = router.num_experts_for(E)
        if n_exp % world:
            out[name] = {"skipped": f"{n_exp} experts do not split over ep={world}"}
            continue
        if state is None:
            state = init_parallel(ParallelConfig(ep=world, backend="gloo"), n_exp, router)
        torch.manual_seed(1234 + rank)
        layer = MoELayer(d, h, n_exp, router=router, shard=state.dims.expert_shard, seed=0)
        connect_process_groups(layer, state.dims, state.groups)
        seen = {}
        inner = layer.dispatcher

        def spy(x, a, experts, inner=inner, seen=seen):
            seen["a"] = a
            return inner(x, a, experts)

        layer.dispatcher = spy
        x = torch.randn(T, d, requires_grad=True)
        y, losses = layer(x)
        (y.square().mean() + sum(losses.values())).backward()
        a = seen["a"]
        dest = a.expert // (n_exp // world)
        distinct = torch.unique(a.token * world + dest).numel()  # (token, destination rank) pairs
        st = layer.last_stats
        out[name] = {
            **{c: st[c] for c in COUNTERS},
            "distinct_pairs": distinct,
            "tokens": T,
            "slots": a.num_slots,
            "k": router.experts_per_token(),
            "experts": n_exp,
        }
    if state is not None:
        state.shutdown()
    queue.put((rank, out))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, default=4, help="gloo processes = ep")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="token-choice capacity factor; default dropless, so volume reflects the "
        "routing rule rather than drops (expert choice always uses c = 2)",
    )
    add_output_args(p, "small shapes (CI)")
    a = parse_args(p, argv)
    if a.quick:
        a.tokens, a.d_model, a.d_ff = 256, 32, 32
    args = {
        "tokens": a.tokens,
        "d_model": a.d_model,
        "d_ff": a.d_ff,
        "experts": a.experts,
        "capacity_factor": a.capacity_factor,
    }
    mach = machine()
    print(machine_line(mach))
    print(
        f"{a.ranks} gloo ranks, ep={a.ranks}; per rank {a.tokens} tokens, d {a.d_model}, "
        f"{a.experts} experts, fp32, capacity factor {a.capacity_factor or 'dropless'}"
    )

    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, a.ranks, port, args, queue)) for r in range(a.ranks)
    ]
    for pr in procs:
        pr.start()
    per_rank = {}
    for _ in procs:
        r, out = queue.get(timeout=600)
        per_rank[r] = out
    for pr in procs:
        pr.join(60)
    bad = [r for r, pr in enumerate(procs) if pr.exitcode not in (0, None)]
    if bad:
        print(f"note: ranks {bad} exited with {[procs[r].exitcode for r in bad]} after reporting")

    elem = 4  # fp32
    rows, results = [], {}
    for name in ROUTERS:
        outs = [per_rank[r][name] for r in range(a.ranks)]
        if "skipped" in outs[0]:
            results[name] = {"skipped": outs[0]["skipped"]}
            rows.append([name, "-", "-", "-", "-", "-", "-", "-", "skipped: " + outs[0]["skipped"]])
            continue
        tok = sum(o["tokens"] for o in outs)
        tot = {c: sum(o[c] for o in outs) for c in (*COUNTERS, "distinct_pairs", "slots")}
        k = outs[0]["k"]
        router = router_for(ROUTERS[name], a.experts, a.ranks, a.capacity_factor)
        nom = nominal_ranks(router, outs[0]["experts"], a.ranks)
        r = {
            "k": k,
            "slots_per_token": tot["slots"] / tok,
            "rows_per_token": tot["dispatch_rows"] / tok,
            "analytic_rows_per_token": tot["distinct_pairs"] / tok,
            "nominal_rows_per_token": nom,
            "dispatch_bytes_per_token": tot["dispatch_bytes"] / tok,
            "analytic_bytes_per_token": tot["distinct_pairs"] * a.d_model * elem / tok,
            "wire_token_bytes_per_token": tot["token_bytes"] / tok,
            "send_bytes_per_token": tot["send_bytes"] / tok,
            "counters_match_analytic": tot["dispatch_rows"] == tot["distinct_pairs"],
        }
        results[name] = r
        rows.append(
            [
                name,
                k,
                f"{r['slots_per_token']:.2f}",
                f"{r['rows_per_token']:.3f}",
                f"{r['analytic_rows_per_token']:.3f}",
                f"{nom:.3f}",
                f"{r['dispatch_bytes_per_token']:,.0f}",
                f"{r['analytic_bytes_per_token']:,.0f}",
                f"{r['send_bytes_per_token']:,.0f}",
            ]
        )
    print_table(
        [
            "router",
            "k",
            "slots/token",
            "dest ranks/token (counter)",
            "(analytic)",
            "(nominal)",
            "dispatch B/token (counter)",
            "analytic B/token",
            "wire B/token (remote, both ways + meta)",
        ],
        rows,
    )
    if all(n in results and "rows_per_token" in results[n] for n in ("switch", "sam2", "topk2")):
        s, w, t = (results[n]["dispatch_bytes_per_token"] for n in ("sam2", "switch", "topk2"))
        verdict = "holds" if abs(s - w) < 1e-9 and s < t else "DOES NOT hold"
        print(
            f"\nSAM(k=2) == Switch(k=1) < top-2: {s:,.0f} == {w:,.0f} < {t:,.0f} B/token: {verdict}"
        )
        results["sam_equals_switch_lt_top2"] = verdict == "holds"
    fields = {"ranks": a.ranks, "ep": a.ranks, "shapes": args, "results": results}
    return publish("comm_volume", mach, fields, a.out)


if __name__ == "__main__":
    main()

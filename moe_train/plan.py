"""moe-train-plan: parameters, memory, all-to-all traffic and compute per GPU, at any scale.

    moe-train-plan model=switch_c router=switch cluster.world_size=2048
    python -m moe_train.plan model=m6t_1t router=prototype cluster=v100_32gb \
        cluster.world_size=480 plan.json=true

Everything is closed-form arithmetic on the config (no GPU, no process group); the parameter count is
cross-checked against the real module built on the `meta` device with one rank's experts.

Formulas (s = sequence length, b = micro batch, d = d_model, a = heads, f = FFN width, V = vocab,
E = experts per MoE layer, k = experts per token, L = layers, bytes unless stated):
- weights: params * param_bytes; gradients: params * param_bytes; optimizer state per param:
  Adam 12 (fp32 master + 2 fp32 moments; 8 when param_bytes = 4), Adafactor 4 (master; the
  factored second moment is ignored), SGD 8 (master + momentum). Dense parameters are replicated on
  every GPU; an expert lives on one rank of each ep group, so world/ep GPUs hold the same expert.
  ZeRO 1 shards optimizer state, ZeRO 2 also gradients: dense over the world, experts over the
  world/ep ranks holding the same experts.
- activations per layer (Korthikanti et al. 2022, arXiv 2205.05198, 16-bit): attention
  11sbd + 5as^2b (the s^2 term dropped with flash attention), two LayerNorms 4sbd, dense FFN
  3sbd + 4sbf (gelu; swiglu 3sbd + 8sbf; f = 4d gives the paper's 34sbd + 5as^2b in total).
  MoE FFN: 3sbd + router (4sbd fp32 input + 8sbE fp32 logits and probs) + per slot (k*s*b slots)
  4d (expert input and output rows) + 4f (gelu; swiglu 8f). LM head: 6sbV (16-bit logits + fp32
  log-softmax) + 2sbd. Full activation checkpointing keeps each block's input (2sbd per layer) plus
  one block's activations while it is recomputed.
- all-to-all per MoE layer and micro-batch: each token row (d * param_bytes bytes) goes once to each
  DISTINCT remote rank holding one of its experts (E[distinct ranks] D for uniform routing: exact
  hypergeometric for top-k, 1 for SAM's device-first routing, k for prototypes on separate ranks,
  ep*(1-(1-1/ep)^k) as the with-replacement approximation where nothing exact applies) and comes
  back (combine): 2 transfers forward, 2 backward, 2 more when checkpointing recomputes the
  forward; plus 20 bytes of slot metadata forward and 4 bytes of weight gradient backward per
  remote slot. Remote share (1 - 1/ep). ep groups are consecutive ranks: a share
  (gpus_per_node-1)/(ep-1) of the remote traffic stays in the node when ep > gpus_per_node.
  Intra- and inter-node links run concurrently: time = max(intra bytes / intra bw, inter / inter).
- FLOPs: 6 * N * tokens + 12 * s * d_attn * L per token (attention scores, fwd + bwd), N = active
  matmul parameters (no position table, the tied head counted once); 8N and 16 s d_attn L with
  activation checkpointing (hardware FLOPs). Compute time = FLOPs / achieved TFLOP/s.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

GiB = 2**30
ARCHITECTURES = ("decoder_only", "encoder_decoder")
OPTIMIZERS = {"adam": 12, "adafactor": 4, "sgd": 8}  # bytes/param with 16-bit weights
OPTIMIZERS_FP32 = {"adam": 8, "adafactor": 0, "sgd": 4}  # with fp32 weights (no master copy)
META_BYTES_FWD, META_BYTES_BWD = 20, 4  # per remote slot: (row, expert) int64 + weight fp32; grad


# ---------------------------------------------------------------------------------------- config
@dataclass
class EncDecConfig:
    """How to count a T5-style encoder-decoder (Switch) from a ModelConfig."""

    encoder_layers: int | None = None  # None = n_layers // 2; the decoder gets the rest
    d_kv: int | None = None  # per-head width; None = d_model / n_heads
    rms_norm: bool = True  # scale only (T5); False = LayerNorm with bias
    relative_buckets: int = 32  # relative position bias: buckets x heads per stack
    tie_embeddings: bool = True


@dataclass
class PlanOptions:
    json: bool = False
    architecture: str = "decoder_only"  # decoder_only | encoder_decoder
    encoder_decoder: EncDecConfig = field(default_factory=EncDecConfig)
    meta_check: bool = True
    compare_routers: bool = True
    suggest: bool = True


@dataclass
class ClusterConfig:
    """The machine and the parallel layout. Bandwidths in GB/s (1e9 bytes) per GPU per direction."""

    world_size: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB
    reserved_gb: float = 2.0  # GiB: CUDA context, NCCL buffers, fragmentation
    intra_node_gbps: float = 150.0
    inter_node_gbps: float = 20.0
    tflops: float = 150.0  # achieved, per GPU
    ep: int | None = None  # None = largest divisor of num_experts that divides world_size
    zero_stage: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    seq_len: int | None = None  # None = model.seq_len
    activation_checkpointing: bool = False
    flash_attention: bool = False
    param_bytes: int = 2
    optimizer: str = "adam"

    def validate(self, num_experts: int) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"cluster.{name}: {msg}")

        for name in ("world_size", "gpus_per_node", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("gpu_memory_gb", "intra_node_gbps", "inter_node_gbps", "tflops"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2):
            raise bad("zero_stage", f"got {self.zero_stage}; allowed: 0, 1, 2")
        if self.param_bytes not in (2, 4):
            raise bad("param_bytes", f"got {self.param_bytes}; allowed: 2 (bf16/fp16), 4 (fp32)")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"got {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        ep = self.ep
        if ep is not None and (ep < 1 or num_experts % ep or self.world_size % ep):
            raise bad(
                "ep",
                f"ep={ep} must divide both num_experts={num_experts} and world_size="
                f"{self.world_size}; choose among {ep_choices(num_experts, self.world_size)}",
            )


def ep_choices(num_experts: int, world: int) -> list[int]:
    """Expert-parallel sizes that divide both the expert count and the world."""
    return [
        e for e in range(1, min(num_experts, world) + 1) if num_experts % e == 0 and world % e == 0
    ]


def resolve_ep(cluster: ClusterConfig, num_experts: int) -> ClusterConfig:
    if cluster.ep is not None:
        return cluster
    return replace(cluster, ep=max(ep_choices(num_experts, cluster.world_size)))


# ---------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCount:
    """Parameters of the whole model (all ranks), by kind."""

    embedding: int  # token table (+ position table, + untied head)
    attention: int
    norms: int
    dense_ffn: int
    router: int
    experts: int  # all experts of all MoE layers
    moe_layers: int
    experts_per_layer: int
    expert_size: int  # one expert: w_in + w_out
    lookup_only: int  # parameters that are looked up, not multiplied (position table, ...)

    @property
    def dense(self) -> int:
        return self.embedding + self.attention + self.norms + self.dense_ffn + self.router

    @property
    def total(self) -> int:
        return self.dense + self.experts

    def active_expert(self, k: float) -> float:
        return k * self.expert_size * self.moe_layers

    def active(self, k: float) -> float:
        return self.dense + self.active_expert(k)


def experts_per_token(router: Any) -> float:
    """Average experts a token runs through (expert choice: c = capacity_factor)."""
    if router.kind == "expert_choice":
        c = float(router.capacity_factor)
        return min(c, router.max_experts_per_token) if router.max_experts_per_token else c
    return float(router.experts_per_token())


def _ffn_mult(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _gate_units(router: Any, num_experts: int) -> int:
    return router.tree_depth if router.kind == "tree" else num_experts


def count_params(
    model: Any, router: Any, architecture: str = "decoder_only", encdec: EncDecConfig | None = None
) -> ParamCount:
    """Closed-form parameter count of MoETransformer (decoder_only) or a T5-style encoder-decoder."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"plan.architecture: got {architecture!r}; allowed: {', '.join(ARCHITECTURES)}"
        )
    d, V, L, h = model.d_model, model.vocab_size, model.n_layers, model.n_heads
    E = router.num_experts_for(model.num_experts)
    mult = _ffn_mult(model.activation)
    expert_size = d * (model.expert_d_ff or model.d_ff) * mult
    units = _gate_units(router, E)
    router_per_layer = d * units + (units if router.kind == "sam" else 0)  # SAM's gate has a bias
    if architecture == "decoder_only":
        moe = sum(model.is_moe_layer(i) for i in range(L))
        embedding = V * d + model.seq_len * d + (0 if model.tie_embeddings else V * d)
        attention = L * 4 * d * d  # qkv [d, 3d] + proj [d, d], no bias
        norms = L * 2 * 2 * d + 2 * d  # LayerNorm weight + bias: two per block + final
        lookup = model.seq_len * d + (V * d if not model.tie_embeddings else 0)
    else:
        ed = encdec or EncDecConfig()
        n_enc = ed.encoder_layers if ed.encoder_layers is not None else L // 2
        n_dec = L - n_enc
        if not 0 < n_enc < L:
            raise ValueError(
                f"plan.encoder_decoder.encoder_layers: must be in [1, {L - 1}], got {n_enc}"
            )
        inner = h * (ed.d_kv or d // h)  # attention width: heads x d_kv
        moe = sum(model.is_moe_layer(i) for i in range(n_enc)) + sum(
            model.is_moe_layer(i) for i in range(n_dec)
        )
        embedding = V * d * (1 if ed.tie_embeddings else 2)
        rel = 2 * ed.relative_buckets * h  # one relative-bias table per stack
        attention = (n_enc * 4 + n_dec * 8) * d * inner + rel  # decoder: self + cross attention
        norm = d if ed.rms_norm else 2 * d
        norms = (2 * n_enc + 3 * n_dec + 2) * norm  # + final norm of each stack
        lookup = rel + (V * d if not ed.tie_embeddings else 0)
        L = n_enc + n_dec
    dense_ffn = (L - moe) * d * model.d_ff * mult
    return ParamCount(
        embedding=embedding,
        attention=attention,
        norms=norms,
        dense_ffn=dense_ffn,
        router=moe * router_per_layer,
        experts=moe * E * expert_size,
        moe_layers=moe,
        experts_per_layer=E,
        expert_size=expert_size,
        lookup_only=lookup,
    )


# --------------------------------------------------------------------------- meta-device check
@contextlib.contextmanager
def one_rank_build(ep: int, rank: int = 0) -> Iterator[object]:
    """Build MoETransformer as ep-rank `rank` of `ep` without a process group.

    Yields a stand-in ep_group. Patches, for the duration only: `moe_train.layer.Dispatcher` (reads
    the fake group's size/rank instead of torch.distributed) and ExpertBank.reset_parameters (a
    no-op on meta tensors: its per-expert seeding calls .item(), which fails under
    `torch.device("meta")`).
    """
    from . import layer
    from .dispatch import Dispatcher
    from .experts import ExpertBank

    class _Group:
        def __init__(self, size: int, rank: int):
            self._size, self._rank = size, rank

    class _OneRankDispatcher(Dispatcher):
        def __init__(self, num_experts: int, ep_group: Any = None):
            super().__init__(num_experts, None)
            if isinstance(ep_group, _Group):
                if num_experts % ep_group._size:
                    raise ValueError(
                        f"model.num_experts={num_experts} is not divisible by cluster.ep={ep_group._size}"
                    )
                self.ep, self.ep_rank = ep_group._size, ep_group._rank
                self.num_local = num_experts // self.ep
                self.first_expert = self.ep_rank * self.num_local

    reset = ExpertBank.reset_parameters

    def _reset(self: Any) -> None:
        if not self.w_in.is_meta:
            reset(self)

    saved = layer.Dispatcher
    layer.Dispatcher = _OneRankDispatcher  # type: ignore[misc]
    ExpertBank.reset_parameters = _reset  # type: ignore[method-assign]
    try:
        yield _Group(ep, rank)
    finally:
        layer.Dispatcher = saved  # type: ignore[misc]
        ExpertBank.reset_parameters = reset  # type: ignore[method-assign]


def meta_count(model: Any, router: Any, ep: int, rank: int = 0) -> dict[str, float]:
    """Parameters of one rank's MoETransformer built on the meta device (no memory, no init)."""
    import torch

    from .model import MoETransformer

    t0 = time.perf_counter()
    with one_rank_build(ep, rank) as group, torch.device("meta"):
        module = MoETransformer(replace(model), replace(router), ep_group=group)
    counts = module.num_params()
    return {**counts, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------- memory
def optimizer_bytes(cluster: ClusterConfig) -> int:
    table = OPTIMIZERS if cluster.param_bytes == 2 else OPTIMIZERS_FP32
    return table[cluster.optimizer]


def activation_bytes(model: Any, router: Any, cluster: ClusterConfig) -> dict[str, float]:
    """Activation memory of one micro-batch: without and with full activation checkpointing."""
    s = cluster.seq_len or model.seq_len
    b, d, a, V, L = (
        cluster.micro_batch_size,
        model.d_model,
        model.n_heads,
        model.vocab_size,
        model.n_layers,
    )
    E = router.num_experts_for(model.num_experts)
    sb, sbd = s * b, s * b * d
    per_f = 8 if model.activation == "swiglu" else 4  # bytes per row per unit of FFN width

    attn = 11 * sbd + (0 if cluster.flash_attention else 5 * a * s * s * b)
    norms = 4 * sbd
    dense_layer = attn + norms + 3 * sbd + per_f * sb * model.d_ff
    slots = experts_per_token(router) * sb
    moe_ffn = 3 * sbd + 4 * sbd + 8 * sb * _gate_units(router, E)
    moe_ffn += slots * (4 * d + per_f * (model.expert_d_ff or model.d_ff))
    moe_layer = attn + norms + moe_ffn
    layers = [moe_layer if model.is_moe_layer(i) else dense_layer for i in range(L)]
    head = 6 * sb * V + 2 * sbd
    full = sum(layers) + head
    ckpt = 2 * sbd * L + max(layers) + head
    return {
        "no_checkpointing": full,
        "checkpointing": ckpt,
        "moe_layer": moe_layer,
        "dense_layer": dense_layer,
    }


def memory(pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig) -> dict[str, float]:
    """Bytes per GPU by term, plus the fit against the GPU's memory."""
    world, ep = cluster.world_size, cluster.ep or 1
    edp = world // ep  # ranks holding the same experts
    dense, expert = pc.dense, pc.experts / ep
    pb, ob = cluster.param_bytes, optimizer_bytes(cluster)
    z = cluster.zero_stage
    weights = (dense + expert) * pb
    grads = dense * pb / (world if z >= 2 else 1) + expert * pb / (edp if z >= 2 else 1)
    optim = dense * ob / (world if z >= 1 else 1) + expert * ob / (edp if z >= 1 else 1)
    acts = activation_bytes(model, router, cluster)
    act = acts["checkpointing" if cluster.activation_checkpointing else "no_checkpointing"]
    reserved = cluster.reserved_gb * GiB
    total = weights + grads + optim + act + reserved
    capacity = cluster.gpu_memory_gb * GiB
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": act,
        "activations_no_checkpointing": acts["no_checkpointing"],
        "activations_checkpointing": acts["checkpointing"],
        "reserved": reserved,
        "total": total,
        "capacity": capacity,
        "margin": capacity - total,  # < 0: short by that much
        "fits": total <= capacity,
    }


# ------------------------------------------------------------------------------- all-to-all
def _miss(n_total: int, n_rank: int, k: int) -> float:
    """P(none of k distinct uniform picks out of n_total falls in a set of n_rank)."""
    p = 1.0
    for i in range(k):
        if n_total - i <= 0:
            return 0.0
        p *= max(0, n_total - n_rank - i) / (n_total - i)
    return p


def distinct_ranks(router: Any, num_experts: int, ep: int) -> float:
    """Expected distinct ep-ranks holding a token's experts under uniform routing."""
    E = router.num_experts_for(num_experts)
    n = E // ep  # experts per rank, ranks hold contiguous ranges
    kind = router.kind
    if ep == 1:
        return 1.0
    if kind == "switch":
        return 1.0
    if kind == "topk":
        return ep * (1 - _miss(E, n, router.top_k))
    if kind == "prototype":  # k prototypes of E/k contiguous experts, top-1 inside each
        k, size = router.top_k, E // router.top_k
        total = 0.0
        for r in range(ep):
            miss = 1.0
            for p in range(k):
                overlap = max(0, min((r + 1) * n, (p + 1) * size) - max(r * n, p * size))
                miss *= 1 - overlap / size
            total += 1 - miss
        return total
    if kind == "sam":  # one device group, then top-k inside it
        group = E // router.num_groups
        if group <= n:
            return 1.0
        return (group / n) * (1 - _miss(group, n, router.top_k))
    if kind == "tree":  # heap-ordered nodes on a root-to-leaf path
        depth, paths, total = router.tree_depth, 0, 0
        for leaf in range(2**depth):
            node, ranks = 0, {0}
            for level in range(depth):
                node = 2 * node + 1 + ((leaf >> (depth - 1 - level)) & 1)
                ranks.add(node // n)
            total += len(ranks)
            paths += 1
        return total / paths
    # expert choice: every expert takes a token with probability c/E, independently
    c = experts_per_token(router)
    return ep * (1 - (1 - min(1.0, c / E)) ** n)


def a2a(pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig) -> dict[str, float]:
    """All-to-all bytes sent per GPU per optimizer step and the time they take."""
    ep = cluster.ep or 1
    s = cluster.seq_len or model.seq_len
    tokens = s * cluster.micro_batch_size  # per micro-batch per GPU
    D = distinct_ranks(router, model.num_experts, ep)
    remote = 1 - 1 / ep
    transfers = 6 if cluster.activation_checkpointing else 4
    rows = tokens * D * remote
    slots = tokens * experts_per_token(router) * remote
    meta = slots * (META_BYTES_FWD * (transfers // 2 - 1) + META_BYTES_BWD)
    per_layer = transfers * rows * model.d_model * cluster.param_bytes + meta
    total = per_layer * pc.moe_layers * cluster.grad_accum
    g = cluster.gpus_per_node
    intra_share = 1.0 if ep <= g else (g - 1) / (ep - 1)
    t_intra = total * intra_share / (cluster.intra_node_gbps * 1e9)
    t_inter = total * (1 - intra_share) / (cluster.inter_node_gbps * 1e9)
    return {
        "distinct_ranks_per_token": D,
        "bytes_per_gpu_per_step": total,
        "intra_node_share": intra_share,
        "seconds": max(t_intra, t_inter),
    }


def grad_sync(pc: ParamCount, cluster: ClusterConfig) -> dict[str, float]:
    """Ring all-reduce (or ZeRO reduce-scatter + all-gather) bytes per GPU per step; overlappable."""
    world, ep = cluster.world_size, cluster.ep or 1
    edp = world // ep
    pb = cluster.param_bytes
    dense = 2 * (world - 1) / world * pc.dense * pb
    expert = 2 * (edp - 1) / edp * pc.experts / ep * pb
    bw = (
        cluster.inter_node_gbps if world > cluster.gpus_per_node else cluster.intra_node_gbps
    ) * 1e9
    return {"dense_bytes": dense, "expert_bytes": expert, "seconds": (dense + expert) / bw}


def flops(pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig) -> dict[str, float]:
    s = cluster.seq_len or model.seq_len
    n = pc.active(experts_per_token(router)) - pc.lookup_only  # matmul parameters per token
    attn = 12 * s * model.d_model * model.n_layers  # scores + weighted values, fwd + bwd
    per_token = 6 * n + attn
    hw_per_token = (8 * n + attn * 4 / 3) if cluster.activation_checkpointing else per_token
    tokens = s * cluster.micro_batch_size * cluster.grad_accum  # per GPU per step
    return {
        "model_flops_per_token": per_token,
        "flops_per_gpu_per_step": hw_per_token * tokens,
        "flops_per_step": hw_per_token * tokens * cluster.world_size,
        "tokens_per_step": tokens * cluster.world_size,
        "seconds": hw_per_token * tokens / (cluster.tflops * 1e12),
    }


# ---------------------------------------------------------------------------------- the plan
def evaluate(pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig) -> dict[str, Any]:
    mem = memory(pc, model, router, cluster)
    comm = a2a(pc, model, router, cluster)
    comp = flops(pc, model, router, cluster)
    return {
        "memory": mem,
        "a2a": comm,
        "compute": comp,
        "grad_sync": grad_sync(pc, cluster),
        "comm_compute_ratio": comm["seconds"] / comp["seconds"],
    }


def _halvings(x: int) -> list[int]:
    out = [x]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def suggest(
    pc: ParamCount, model: Any, router: Any, cluster: ClusterConfig, max_scale: int = 64
) -> list[dict[str, Any]]:
    """Layouts that fit, cheapest first: fewest GPUs, then fewest changed knobs, then step time.

    Knobs: activation checkpointing, ZeRO stage, ep, micro batch (grad_accum grows to keep the tokens
    per GPU per step), and the world size (x2 up to x max_scale)."""
    E = router.num_experts_for(model.num_experts)
    found: list[tuple[tuple, dict[str, Any]]] = []
    scale = 1
    while scale <= max_scale and not found:
        world = cluster.world_size * scale
        for ep in ep_choices(E, world):
            for zero in range(cluster.zero_stage, 3):
                for ckpt in sorted({cluster.activation_checkpointing, True}):
                    for mb in _halvings(cluster.micro_batch_size):
                        c = replace(
                            cluster,
                            world_size=world,
                            ep=ep,
                            zero_stage=zero,
                            activation_checkpointing=ckpt,
                            micro_batch_size=mb,
                            grad_accum=cluster.grad_accum * cluster.micro_batch_size // mb,
                        )
                        mem = memory(pc, model, router, c)
                        if not mem["fits"]:
                            continue
                        changes = {
                            k: v
                            for k, v in asdict(c).items()
                            if v != getattr(cluster, k) and k != "grad_accum"
                        }
                        ev = evaluate(pc, model, router, c)
                        step = ev["compute"]["seconds"] + ev["a2a"]["seconds"]
                        key = (world, len(changes), step)
                        found.append(
                            (
                                key,
                                {
                                    "changes": changes,
                                    "cluster": asdict(c),
                                    "step_seconds": step,
                                    "memory_per_gpu_bytes": mem["total"],
                                    "margin_bytes": mem["margin"],
                                },
                            )
                        )
        scale *= 2
    return [f for _, f in sorted(found, key=lambda kv: kv[0])]


COMPARE = (
    ("switch", {}),
    ("topk", {"top_k": 2}),
    ("prototype", {"top_k": 2}),
    ("sam", {"top_k": 2}),
    ("expert_choice", {"capacity_factor": 2.0}),
)


def compare_routers(
    pc_fn: Any, model: Any, router: Any, cluster: ClusterConfig
) -> list[dict[str, Any]]:
    """Comm/compute of each router kind on the same model and layout (SAM: one group per ep rank)."""
    E = router.num_experts_for(model.num_experts)
    rows = []
    variants = [(router.kind + " (configured)", router)]
    for kind, extra in COMPARE:
        if kind == router.kind or (kind == "prototype" and E % 2):
            continue
        fields: dict[str, Any] = {"kind": kind, **extra}
        if kind == "sam":  # one group per ep rank when ranks hold >= k experts, else the fewest
            k = extra["top_k"]
            fields["num_groups"] = max(
                g for g in range(1, E // k + 1) if E % g == 0 and g <= (cluster.ep or 1)
            )
            extra = {**extra, "num_groups": fields["num_groups"]}
        variants.append(
            (kind + "".join(f" {k}={v}" for k, v in extra.items()), replace(router, **fields))
        )
    for name, r in variants:
        pc = pc_fn(r)
        ev = evaluate(pc, model, r, cluster)
        rows.append(
            {
                "router": name,
                "experts_per_token": experts_per_token(r),
                "active_params": pc.active(experts_per_token(r)),
                "distinct_ranks_per_token": ev["a2a"]["distinct_ranks_per_token"],
                "a2a_bytes_per_gpu_per_step": ev["a2a"]["bytes_per_gpu_per_step"],
                "a2a_seconds": ev["a2a"]["seconds"],
                "compute_seconds": ev["compute"]["seconds"],
                "comm_compute_ratio": ev["comm_compute_ratio"],
            }
        )
    return rows


def make_plan(
    model: Any, router: Any, cluster: ClusterConfig, options: PlanOptions | None = None
) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (see the module docstring for every formula)."""
    options = options or PlanOptions()
    model.validate()
    E = router.num_experts_for(model.num_experts)
    router.validate(E)
    cluster.validate(E)
    cluster = resolve_ep(cluster, E)
    ep = cluster.ep or 1

    def pc_fn(r: Any) -> ParamCount:
        return count_params(model, r, options.architecture, options.encoder_decoder)

    pc = pc_fn(router)
    k = experts_per_token(router)
    ev = evaluate(pc, model, router, cluster)
    mem = ev["memory"]
    params_per_gpu = pc.dense + pc.experts / ep
    plan: dict[str, Any] = {
        "architecture": options.architecture,
        "total_params": pc.total,
        "active_params": pc.active(k),
        "params_per_gpu": params_per_gpu,
        "memory_per_gpu_bytes": mem["total"],
        "fits": mem["fits"],
        "a2a_bytes_per_gpu_per_step": ev["a2a"]["bytes_per_gpu_per_step"],
        "params": {
            **asdict(pc),
            "dense": pc.dense,
            "total": pc.total,
            "experts_per_token": k,
            "active_dense": pc.dense,
            "active_expert": pc.active_expert(k),
            "dense_per_gpu": pc.dense,
            "expert_per_gpu": pc.experts / ep,
        },
        "cluster": asdict(cluster),
        "dp_expert": cluster.world_size // ep,
        **ev,
    }
    if options.meta_check:
        mc = meta_count(model, router, ep)
        dec = pc if options.architecture == "decoder_only" else count_params(model, router)
        plan["meta_check"] = {
            **mc,
            "analytic_dense": dec.dense,
            "analytic_expert_per_rank": dec.experts // ep,
            "match": mc["dense"] == dec.dense and mc["expert"] == dec.experts // ep,
        }
    if options.compare_routers:
        plan["routers"] = compare_routers(pc_fn, model, router, cluster)
    if not mem["fits"] and options.suggest:
        cands = suggest(pc, model, router, cluster)
        plan["suggestion"] = cands[0] if cands else None
        plan["suggestions"] = cands[:5]
        if cands and cands[0]["cluster"]["world_size"] > cluster.world_size:
            # on the GPUs you have: a lighter optimizer (not one of the searched knobs)
            for opt in (o for o in OPTIMIZERS if o != cluster.optimizer):
                alt = suggest(pc, model, router, replace(cluster, optimizer=opt), max_scale=1)
                if alt:
                    plan["suggestion_same_gpus"] = {
                        **alt[0],
                        "changes": {"optimizer": opt, **alt[0]["changes"]},
                    }
                    break
    return plan


# ---------------------------------------------------------------------------------- printing
def _n(x: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.3f}{unit}"
    return f"{x:.0f}"


def _b(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


def _t(x: float) -> str:
    return f"{x * 1e3:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    cols = [header, *rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = "  ".join("-" * x for x in w)
    fmt = lambda r: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([title, fmt(header), line, *map(fmt, rows), ""])


def render(plan: dict[str, Any], names: dict[str, str]) -> str:
    p, c, m = plan["params"], plan["cluster"], plan["memory"]
    out = [
        f"moe-train-plan  model={names.get('model', '?')}  router={names.get('router', '?')}  "
        f"architecture={plan['architecture']}  world={c['world_size']}  ep={c['ep']}  "
        f"dp(expert)={plan['dp_expert']}  zero={c['zero_stage']}  micro_batch={c['micro_batch_size']}"
        f"x{c['seq_len'] or '?'}  accum={c['grad_accum']}  ckpt={c['activation_checkpointing']}\n"
    ]
    out.append(
        _table(
            "Parameters",
            ["", "total", "active/token", "per GPU"],
            [
                [
                    "dense (emb, attn, norms, dense FFN, routers)",
                    _n(p["dense"]),
                    _n(p["active_dense"]),
                    _n(p["dense_per_gpu"]),
                ],
                [
                    f"expert ({p['moe_layers']} MoE layers x {p['experts_per_layer']} x {_n(p['expert_size'])}, "
                    f"k={p['experts_per_token']:g})",
                    _n(p["experts"]),
                    _n(p["active_expert"]),
                    _n(p["expert_per_gpu"]),
                ],
                [
                    "total",
                    _n(plan["total_params"]),
                    _n(plan["active_params"]),
                    _n(plan["params_per_gpu"]),
                ],
            ],
        )
    )
    if "meta_check" in plan:
        mc = plan["meta_check"]
        out.append(
            f"meta-device check (decoder-only module, rank 0 of ep={c['ep']}): dense {_n(mc['dense'])}, "
            f"expert {_n(mc['expert'])} -> {'matches' if mc['match'] else 'MISMATCH'} the analytic "
            f"count ({mc['seconds']:.2f} s)\n"
        )
    mrows = [
        [k, _b(m[k])] for k in ("weights", "gradients", "optimizer", "activations", "reserved")
    ]
    mrows += [
        ["  activations without checkpointing", _b(m["activations_no_checkpointing"])],
        ["  activations with checkpointing", _b(m["activations_checkpointing"])],
        ["total", _b(m["total"])],
        ["GPU memory", _b(m["capacity"])],
        [
            "fits" if m["fits"] else "DOES NOT FIT",
            ("spare " if m["fits"] else "short by ") + _b(abs(m["margin"])),
        ],
    ]
    out.append(_table("Memory per GPU", ["", "bytes"], mrows))
    a, f, g = plan["a2a"], plan["compute"], plan["grad_sync"]
    out.append(
        _table(
            "Per optimizer step, per GPU",
            ["", "value"],
            [
                ["tokens per step (global)", _n(f["tokens_per_step"])],
                ["FLOPs per GPU", _n(f["flops_per_gpu_per_step"])],
                ["compute time", _t(f["seconds"])],
                ["all-to-all: distinct ranks per token", f"{a['distinct_ranks_per_token']:.3f}"],
                ["all-to-all bytes sent", _b(a["bytes_per_gpu_per_step"])],
                ["all-to-all intra-node share", f"{a['intra_node_share']:.1%}"],
                ["all-to-all time", _t(a["seconds"])],
                ["comm / compute", f"{plan['comm_compute_ratio']:.2f}"],
                [
                    "grad sync bytes (dense + expert, overlappable)",
                    _b(g["dense_bytes"] + g["expert_bytes"]),
                ],
                ["grad sync time", _t(g["seconds"])],
            ],
        )
    )
    if "routers" in plan:
        out.append(
            _table(
                "Routers on this layout",
                [
                    "router",
                    "k",
                    "active",
                    "ranks/token",
                    "a2a bytes",
                    "a2a time",
                    "compute",
                    "comm/compute",
                ],
                [
                    [
                        r["router"],
                        f"{r['experts_per_token']:g}",
                        _n(r["active_params"]),
                        f"{r['distinct_ranks_per_token']:.2f}",
                        _b(r["a2a_bytes_per_gpu_per_step"]),
                        _t(r["a2a_seconds"]),
                        _t(r["compute_seconds"]),
                        f"{r['comm_compute_ratio']:.2f}",
                    ]
                    for r in plan["routers"]
                ],
            )
        )
    if not m["fits"] and "suggestion" in plan:
        s = plan["suggestion"]
        if s is None:
            out.append(
                "No layout up to 64x the GPUs fits: shrink the model or use a lighter optimizer.\n"
            )
        else:
            ch = ", ".join(f"cluster.{k}={v}" for k, v in s["changes"].items())
            out.append(
                f"To fit: {ch}  ({_b(s['memory_per_gpu_bytes'])} per GPU, step ~{_t(s['step_seconds'])})"
            )
            for alt in plan["suggestions"][1:]:
                out.append(
                    "   or: " + ", ".join(f"cluster.{k}={v}" for k, v in alt["changes"].items())
                )
            same = plan.get("suggestion_same_gpus")
            if same:
                ch = ", ".join(f"cluster.{k}={v}" for k, v in same["changes"].items())
                out.append(
                    f"On {c['world_size']} GPUs: {ch}  ({_b(same['memory_per_gpu_bytes'])} per GPU)"
                )
            out.append("")
    return "\n".join(out)


# -------------------------------------------------------------------------------------- Hydra
def _to_dataclass(cls: type, node: Any, where: str) -> Any:
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
    except Exception as e:  # unknown key or wrong type, named by OmegaConf
        raise ValueError(f"{where}: {e}".splitlines()[0]) from None
    return OmegaConf.to_object(merged)


def plan_from_config(cfg: Any) -> tuple[dict[str, Any], PlanOptions]:
    from .model import ModelConfig
    from .routing import RouterConfig

    model = _to_dataclass(ModelConfig, cfg.model, "model")
    router = _to_dataclass(RouterConfig, cfg.router, "router")
    cluster = _to_dataclass(ClusterConfig, cfg.cluster, "cluster")
    options = _to_dataclass(PlanOptions, cfg.plan, "plan")
    if cluster.seq_len is None:
        cluster.seq_len = model.seq_len
    return make_plan(model, router, cluster, options), options


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**63:
        return int(x)
    return x


def run(cfg: Any) -> None:
    try:
        plan, options = plan_from_config(cfg)
    except ValueError as e:
        sys.exit(f"moe-train-plan: {e}")
    if options.json:
        print(json.dumps(_jsonable(plan)))
        return
    names: dict[str, str] = {}
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        names = dict(HydraConfig.get().runtime.choices)
    print(render(plan, names))


def main() -> None:
    import hydra

    from .config import CONFIG_DIR

    hydra.main(config_path=CONFIG_DIR, config_name="plan", version_base=None)(run)()


if __name__ == "__main__":
    main()

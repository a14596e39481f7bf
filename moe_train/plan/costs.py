"""Closed-form costs of one optimizer step per GPU: memory, all-to-all traffic, gradient sync, FLOPs.

Inputs: the trainer's own TrainConfig (model, router, parallel, trainer, optim) and the machine
(ClusterConfig). The micro batch and the accumulation are the trainer's split of
trainer.global_batch_size over cluster.world_size ranks (TrainerConfig.batch_split).

Formulas (s = model.seq_len, b = micro batch, d = d_model, a = heads, f = FFN width, V = vocab,
E = experts per MoE layer, k = experts per token, L = layers, bytes unless stated):
- training state, as the trainer keeps it: fp32 weights (4 bytes/param), fp32 gradients (4) and
  the optimizer's fp32 state (AdamW 8; Adafactor only factored row/column statistics, taken as 0
  here and counted exactly in the plan's state_bytes_per_gpu). Without FSDP dense parameters are
  on every GPU and an expert on one rank of each ep group; with parallel.fsdp dense state is
  sharded over the world and expert state over the world/ep ranks holding the same experts.
- transient weights and gradients (compute precision, 2 bytes in bf16/fp16, 4 in fp32): with FSDP
  the gathered weights of the unit running and the one prefetched plus one unit's unsharded
  gradients (3 units; a unit is a block with its local experts, or the embeddings), or with
  reshard_after_forward=false every local weight gathered from forward to backward plus one
  unit; without FSDP autocast's 16-bit copies of the local weights. With FSDP and gradient
  accumulation the unsharded fp32 gradients of all local parameters (reduce-scattered once).
- activations per layer (Korthikanti et al. 2022, arXiv 2205.05198, 16-bit): attention
  3sbd + 4sb(q + kv) + 5as^2b with q = heads x head_dim and kv = key/value heads x head_dim (11sbd
  + 5as^2b for multi-head attention with head_dim = d / a; the s^2 term dropped with
  cluster.flash_attention), two norms 4sbd, dense FFN
  3sbd + 4sbf (gelu; swiglu 3sbd + 8sbf; f = 4d gives the paper's 34sbd + 5as^2b in total).
  MoE FFN: 3sbd + router (4sbd fp32 input + 8sb * gate units fp32 logits and probs) + per slot
  (k*s*b slots) 4d (expert input and output rows) + 4f (gelu; swiglu 8f). LM head: 6sbV (16-bit
  logits + fp32 log-softmax) + 2sbd. Full activation checkpointing keeps each block's input (2sbd
  per layer) plus one block's activations while it is recomputed; `moe` checkpointing drops
  the expert hidden activations (slots * f) of every MoE layer and recomputes one layer's.
- all-to-all per MoE layer and micro-batch: each token row (d * compute bytes) goes once to each
  DISTINCT remote rank holding one of its experts (the router class's `expected_ranks` for uniform
  routing: exact hypergeometric for top-k, 1 for SAM's device-first routing, k for prototypes on
  separate ranks, ep*(1-(1-1/ep)^k) as the with-replacement default) and comes back (combine):
  2 transfers forward, 2 backward, 2 more when full checkpointing recomputes the forward; plus 12 bytes
  of slot metadata forward and 4 bytes of weight gradient backward per remote slot. Remote share
  (1 - 1/ep). ep groups are consecutive ranks: a share (gpus_per_node-1)/(ep-1) of the remote
  traffic stays in the node when ep > gpus_per_node. Intra- and inter-node links run
  concurrently: time = max(intra bytes / intra bw, inter / inter).
- FLOPs: 6 * N * tokens + 12 * s * q * L per token (attention scores and values over the query
  width q = heads x head_dim, fwd + bwd; GQA shares k and v, not the scores), N = active
  matmul parameters (no position table, the tied head counted once); 8N and 16 s q L with
  full activation checkpointing, 6N + 2 N_expert with `moe` (hardware FLOPs). Compute time =
  FLOPs / achieved TFLOP/s.
- gradient sync: without FSDP a ring all-reduce of fp32 gradients; with FSDP a reduce-scatter of
  fp32 gradients per step and an all-gather of compute-precision weights per micro-batch (two
  with reshard_after_forward), dense over the world and experts over world/ep ranks.
"""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..routing import router_class
from .config import ClusterConfig, GiB
from .options import per_rank_batch
from .params import ParamCount, attention_widths, count_params

META_BYTES_FWD, META_BYTES_BWD = 12, 4  # per remote slot: (row, expert, weight) packed int32; grad


F32 = 4  # the trainer keeps weights, gradients and optimizer state in fp32
# optimizer-state bytes per parameter, by optim.name (fp32 weights and gradients are 4 + 4 more):
# AdamW two fp32 moments; Adafactor only factored statistics (a row and a column per matrix,
# about 4 (r + c) bytes per r x c matrix: counted exactly in state_bytes_per_gpu, as 0 here)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adafactor": 0}


def optimizer_bytes(cfg: TrainConfig) -> int:
    """Optimizer-state bytes per parameter of optim.name (closed form; OPTIMIZER_STATE_BYTES)."""
    return OPTIMIZER_STATE_BYTES[cfg.optim.name]


def compute_bytes(cfg: TrainConfig) -> int:
    """Bytes of an activation / gathered weight in compute precision (auto: 16-bit on a GPU)."""
    return 4 if cfg.trainer.precision == "fp32" else 2


def sharded(cfg: TrainConfig, cluster: ClusterConfig) -> bool:
    """FSDP shards only with more than one rank (one process trains unsharded)."""
    return cfg.parallel.fsdp and cluster.world_size > 1


def activation_bytes(cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, float]:
    """Activation memory of one micro-batch: without and with full activation checkpointing."""
    model, router = cfg.model, cfg.router
    b, _ = per_rank_batch(cfg, cluster)
    s, d, a, V, L = model.seq_len, model.d_model, model.n_heads, model.vocab_size, model.n_layers
    cls = router_class(router.kind)
    units = cls.gate_units(router, cls.num_experts_for(router, model.num_experts))
    sb, sbd = s * b, s * b * d
    per_f = 8 if model.activation == "swiglu" else 4  # bytes per row per unit of FFN width

    q, kv = attention_widths(model)
    attn = 3 * sbd + 4 * sb * (q + kv) + (0 if cluster.flash_attention else 5 * a * s * s * b)
    norms = 4 * sbd
    dense_layer = attn + norms + 3 * sbd + per_f * sb * model.d_ff
    slots = router.experts_per_token() * sb
    moe_ffn: float = 3 * sbd + 4 * sbd + 8 * sb * units
    moe_ffn += slots * (4 * d + per_f * (model.expert_d_ff or model.d_ff))
    if getattr(model, "shared_experts", 0):  # the shared experts' hidden rows and output
        moe_ffn += sb * (per_f * model.shared_experts * model.shared_width + 4 * d)
    moe_layer = attn + norms + moe_ffn
    layers = [moe_layer if model.is_moe_layer(i) else dense_layer for i in range(L)]
    head = 6 * sb * V + 2 * sbd
    expert_hidden = slots * per_f * (model.expert_d_ff or model.d_ff)
    moe_layers = sum(model.is_moe_layer(i) for i in range(L))
    return {
        "no_checkpointing": sum(layers) + head,
        "checkpointing": 2 * sbd * L + max(layers) + head,
        "moe_checkpointing": sum(layers) + head - (moe_layers - 1) * expert_hidden
        if moe_layers
        else sum(layers) + head,
        "moe_layer": moe_layer,
        "dense_layer": dense_layer,
    }


ACTIVATIONS_KEY = {"none": "no_checkpointing", "moe": "moe_checkpointing", "full": "checkpointing"}


def _unit_params(pc: ParamCount, cfg: TrainConfig) -> float:
    """Parameters of the largest FSDP unit on one GPU: a block with its local experts, or the
    embeddings (the root unit)."""
    ep, L = cfg.parallel.ep, max(1, cfg.model.n_layers)
    block = (pc.dense - pc.embedding) / L + pc.experts / ep / max(1, pc.moe_layers)
    return max(block, pc.embedding)


def memory(pc: ParamCount, cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, float]:
    """Bytes per GPU by term (the trainer's: see the module docstring), and the fit."""
    world, ep = cluster.world_size, cfg.parallel.ep
    edp = world // ep  # ranks holding the same experts
    local = pc.dense + pc.experts / ep  # parameters on this GPU before sharding
    fsdp = sharded(cfg, cluster)
    shards = (world, edp) if fsdp else (1, 1)
    held = pc.dense / shards[0] + pc.experts / ep / shards[1]  # parameters whose state is here
    cb = compute_bytes(cfg)
    _, grad_accum = per_rank_batch(cfg, cluster)
    if fsdp:
        unit = _unit_params(pc, cfg)
        gathered = local if not cfg.parallel.reshard_after_forward else 2 * unit
        transient = cb * (gathered + unit)
        if grad_accum > 1:  # unsharded gradients accumulate until the last micro-batch
            transient += F32 * local
    else:
        transient = cb * local if cb < F32 else 0.0  # autocast's low-precision weight copies
    acts = activation_bytes(cfg, cluster)
    act = acts[ACTIVATIONS_KEY[cfg.trainer.activation_checkpointing]]
    weights, grads, optim = F32 * held, F32 * held, optimizer_bytes(cfg) * held
    reserved = cluster.reserved_gb * GiB
    total = weights + grads + optim + transient + act + reserved
    capacity = cluster.gpu_memory_gb * GiB
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "transient_weights_and_gradients": transient,
        "activations": act,
        "activations_no_checkpointing": acts["no_checkpointing"],
        "activations_moe_checkpointing": acts["moe_checkpointing"],
        "activations_checkpointing": acts["checkpointing"],
        "reserved": reserved,
        "total": total,
        "capacity": capacity,
        "margin": capacity - total,  # < 0: short by that much
        "fits": total <= capacity,
    }


def distinct_ranks(router: Any, num_experts: int, ep: int) -> float:
    """Expected distinct ep-ranks holding a token's experts under uniform routing."""
    if ep == 1:
        return 1.0
    cls = router_class(router.kind)
    return cls.expected_ranks(router, cls.num_experts_for(router, num_experts), ep)


def a2a(pc: ParamCount, cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, float]:
    """All-to-all bytes sent per GPU per optimizer step and the time they take."""
    model, router, ep = cfg.model, cfg.router, cfg.parallel.ep
    micro, grad_accum = per_rank_batch(cfg, cluster)
    tokens = model.seq_len * micro  # per micro-batch per GPU
    D = distinct_ranks(router, model.num_experts, ep)
    remote = 1 - 1 / ep
    transfers = 6 if cfg.trainer.activation_checkpointing == "full" else 4
    rows = tokens * D * remote
    slots = tokens * router.experts_per_token() * remote
    meta = slots * (META_BYTES_FWD * (transfers // 2 - 1) + META_BYTES_BWD)
    per_layer = transfers * rows * model.d_model * compute_bytes(cfg) + meta
    total = per_layer * pc.moe_layers * grad_accum
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


def grad_sync(pc: ParamCount, cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, float]:
    """Gradient reduction (and FSDP's weight all-gathers) bytes per GPU per step; overlappable."""
    world, ep = cluster.world_size, cfg.parallel.ep
    edp = world // ep
    _, grad_accum = per_rank_batch(cfg, cluster)
    fsdp, cb = sharded(cfg, cluster), compute_bytes(cfg)

    def traffic(params: float, ranks: int) -> float:
        if ranks == 1:
            return 0.0
        share = (ranks - 1) / ranks
        if not fsdp:
            return 2 * share * params * F32  # ring all-reduce of fp32 gradients
        gathers = (2 if cfg.parallel.reshard_after_forward else 1) * grad_accum
        return share * params * (F32 + gathers * cb)

    dense, expert = traffic(pc.dense, world), traffic(pc.experts / ep, edp)
    multi_node = world > cluster.gpus_per_node
    bw = (cluster.inter_node_gbps if multi_node else cluster.intra_node_gbps) * 1e9
    return {"dense_bytes": dense, "expert_bytes": expert, "seconds": (dense + expert) / bw}


def _flops_per_token(
    pc: ParamCount, model: Any, router: Any, recompute: str
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs with `recompute`) per token at model.seq_len."""
    n = pc.active(router.experts_per_token()) - pc.lookup_only  # matmul parameters per token
    q, _ = attention_widths(model)
    attn = 12 * model.seq_len * q * model.n_layers  # scores + values, fwd + bwd
    per_token = 6 * n + attn
    if recompute == "full":
        return per_token, 8 * n + attn * 4 / 3
    if recompute == "moe":
        return per_token, per_token + 2 * pc.active_expert(router.experts_per_token())
    return per_token, per_token


def flops(pc: ParamCount, cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, float]:
    """Model FLOPs per token and hardware FLOPs per GPU per step (recompute included)."""
    recompute = cfg.trainer.activation_checkpointing
    per_token, hw_per_token = _flops_per_token(pc, cfg.model, cfg.router, recompute)
    micro, grad_accum = per_rank_batch(cfg, cluster)
    tokens = cfg.model.seq_len * micro * grad_accum  # per GPU per step
    return {
        "model_flops_per_token": per_token,
        "flops_per_gpu_per_step": hw_per_token * tokens,
        "flops_per_step": hw_per_token * tokens * cluster.world_size,
        "tokens_per_step": tokens * cluster.world_size,
        "seconds": hw_per_token * tokens / (cluster.tflops * 1e12),
    }


def model_flops_per_token(model: Any, router: Any) -> float:
    """Training FLOPs per token of MoETransformer(model, router) at model.seq_len: 6 N_active +
    attention, no recomputation (what MFU is measured against, in training and in the plan)."""
    return float(_flops_per_token(count_params(model, router), model, router, "none")[0])


def estimate_step(pc: ParamCount, cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, Any]:
    """Memory, all-to-all, compute and gradient sync of one step of `cfg` on `cluster`."""
    mem = memory(pc, cfg, cluster)
    comm = a2a(pc, cfg, cluster)
    comp = flops(pc, cfg, cluster)
    return {
        "memory": mem,
        "a2a": comm,
        "compute": comp,
        "grad_sync": grad_sync(pc, cfg, cluster),
        "comm_compute_ratio": comm["seconds"] / comp["seconds"],
    }

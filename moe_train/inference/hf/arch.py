"""The stock Hugging Face MoE classes a model of ours maps onto exactly, and why the others do not.

One `Family` per class (the table FAMILIES): its config.json fields, its tensor names, what it
can hold. `choose` picks the family for a (ModelConfig, RouterConfig) or says, field by field,
why none fits; `conversion` builds the pieces (conversion.py) for a config; `hf_config` writes
config.json's fields and `from_hf_config` reads them back (import).

Every field of our configs is in exactly one of: MAPPED (written to config.json), TRAINING_ONLY
(no effect on the dropless eval forward the export computes), or refused when it differs from
its default. A field added later (a new router option) is therefore refused by name until a
family maps it: nothing is dropped silently.

    ours                              Mixtral              Qwen3-MoE / Qwen2-MoE
    topk (renormalised over k)        yes (every layer)    norm_topk_prob=true
    switch (top-1, weight = prob)     no (renormalises)    num_experts_per_tok=1, norm_topk_prob=false
    qk_norm=head (per-head RMSNorm)   no                   Qwen3-MoE (always has it)
    topk, normalize_topk=false        no                   norm_topk_prob=false
    qk_norm=none                      yes                  Qwen2-MoE (qkv_bias=false)
    dense layers (moe_every, first_dense)  no              decoder_sparse_step, mlp_only_layers
    shared experts (shared_experts)   no                   Qwen2-MoE shared_expert (gate_proj, up_proj
                                                           = w_in's halves, down_proj = w_out),
                                                           shared_expert_gate = w_gate; ungated:
                                                           gate 0 (sigmoid = 1/2), down_proj 2 w_out;
                                                           none: an empty shared expert (exact zeros)
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from ...model import ModelConfig
from ...routing import RouterConfig
from .conversion import Conversion, Ref


class HFExportError(ValueError):
    """A model no stock Hugging Face class holds exactly; the message names the field, the
    reason and the alternative."""


REMOTE = (
    "export it with `--format hf-remote` (a folder with moe-train's own modeling file: "
    "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)) or `--format moe-train` "
    "(moe_train.from_pretrained loads it)"
)

# ModelConfig fields that change nothing in an eval forward (written where HF has a field)
MODEL_TRAINING_ONLY = ("dropout", "init_std", "seq_len", "init_from")
# RouterConfig fields that act only in training (capacity, losses, noise, init) or on other kinds
ROUTER_TRAINING_ONLY = (
    "capacity_factor", "drop_policy", "normalize", "group_size", "z_loss_coef", "balance_coef",
    "alignment_coef", "jitter_eps", "random_routing", "init_scale", "router_dtype",
    "max_experts_per_token", "num_groups", "tree_depth", "tree_gate",
)  # fmt: skip
# fields every family writes (config.json) from ours
MODEL_MAPPED = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
    "num_experts", "expert_d_ff", "moe_every", "first_dense", "activation", "norm", "norm_eps",
    "position", "rope_theta", "qk_norm", "tie_embeddings", "shared_experts", "shared_d_ff",
    "shared_gate",
)  # fmt: skip
ROUTER_MAPPED = ("kind", "top_k", "normalize_topk", "eval_capacity_factor")


@dataclass(frozen=True)
class Family:
    """One stock class. `moe` is the MoE block's module name, `experts` the per-expert
    (gate, up, down) names, `shared` whether every MoE block has a gated shared expert (Qwen2-MoE:
    ours map onto it, and a model without them gets an empty one)."""

    name: str  # the --arch value
    model_type: str
    architecture: str
    moe: str
    experts: tuple[str, str, str]
    qk_norm: str  # none | head: what the class always has
    renormalised: tuple[bool, ...]  # the top-k weightings it computes (Routing.renormalised)
    dense_layers: bool  # decoder_sparse_step / mlp_only_layers
    experts_field: str  # config.json's name for the expert count
    shared: bool = False
    refused: str = ""  # why no model of ours maps onto it ("" = it can)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "mixtral",
            "mixtral",
            "MixtralForCausalLM",
            "block_sparse_moe",
            ("w1", "w3", "w2"),
            "none",
            (True,),
            False,
            "num_local_experts",
        ),
        Family(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "head",
            (True, False),
            True,
            "num_experts",
        ),
        Family(
            "qwen2_moe",
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "none",
            (True, False),
            True,
            "num_experts",
            shared=True,
        ),
        Family(
            "olmoe",
            "olmoe",
            "OlmoeForCausalLM",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "none",
            (True,),
            False,
            "num_experts",
            refused="OLMoE normalises q and k over the whole projection (all heads "
            "together, q_norm [h dh]); moe-train's qk_norm is per head (Qwen3's), and OLMoE "
            "always has it, so no moe-train body computes what it computes",
        ),
    )  # fmt: skip
}


@dataclass(frozen=True)
class Routing:
    """What a router kind is in HF's softmax top-k: k = router.experts_per_token(), and whether
    the k weights are renormalised (Qwen's norm_topk_prob; Mixtral always renormalises; topk:
    router.normalize_topk, see `renormalised`)."""

    renormalised: bool
    follows_normalize_topk: bool = False  # renormalised = router.normalize_topk (topk)


def renormalised(router: RouterConfig) -> bool | None:
    """Whether this router's k weights are renormalised (None: not a mapped routing)."""
    routing = ROUTINGS.get(router.kind)
    if routing is None:
        return None
    return router.normalize_topk if routing.follows_normalize_topk else routing.renormalised


# router.kind -> its HF routing (a new mapped kind, e.g. sigmoid scores, is one entry here)
ROUTINGS = {
    "topk": Routing(renormalised=True, follows_normalize_topk=True),
    "switch": Routing(renormalised=False),
}
WHY_NOT = {
    "sam": "SAM's gate has a bias and routes within device groups",
    "expert_choice": "expert choice is not causal (experts pick tokens across the batch)",
}
AUTO_ORDER = ("mixtral", "qwen3_moe", "qwen2_moe")  # the first that fits is chosen


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # pragma: no cover - none today
            out[f.name] = f.default_factory()
    return out


def changed_options(
    model: ModelConfig,
    router: RouterConfig,
    known_model: tuple[str, ...],
    known_router: tuple[str, ...],
) -> list[tuple[str, Any]]:
    """("group.name", value) of every config field outside the known ones whose value differs
    from its default: what an exporter that knows only those fields must refuse."""
    out = []
    for cfg, group, known in ((model, "model", known_model), (router, "router", known_router)):
        for name, default in _defaults(type(cfg)).items():
            if name not in known and getattr(cfg, name) != default:
                out.append((f"{group}.{name}", getattr(cfg, name)))
    return out


def unmapped_options(model: ModelConfig, router: RouterConfig) -> list[str]:
    """Config fields no family maps that differ from their default (e.g. a router option added
    after this table): each refused by name."""
    known_model, known_router = (
        MODEL_MAPPED + MODEL_TRAINING_ONLY,
        ROUTER_MAPPED + ROUTER_TRAINING_ONLY,
    )
    return [
        f"{name}={value!r}: no Hugging Face class mapping for this option yet "
        "(moe_train/inference/hf/arch.py)"
        for name, value in changed_options(model, router, known_model, known_router)
    ]


def family_refusals(fam: Family, model: ModelConfig, router: RouterConfig) -> list[str]:
    """Why `fam` cannot hold this model exactly ([] = it can)."""
    if fam.refused:
        return [f"{fam.architecture}: {fam.refused}"]
    out = unmapped_options(model, router)
    body = {"norm": "rmsnorm", "position": "rope", "activation": "swiglu"}
    for k, want in body.items():
        if getattr(model, k) != want:
            out.append(f"model.{k}={getattr(model, k)!r}: {fam.architecture} has {k}={want!r} only")
    if model.qk_norm != fam.qk_norm:
        out.append(
            f"model.qk_norm={model.qk_norm!r}: {fam.architecture} has qk_norm={fam.qk_norm!r}"
        )
    # the table, not the registry: HF's routing per kind
    renorm = renormalised(router)
    if renorm is None or renorm not in fam.renormalised:
        why = WHY_NOT.get(router.kind, "its routing is not a softmax top-k")
        kinds = [k for k, r in ROUTINGS.items() if r.renormalised in fam.renormalised]
        if renorm is False and ROUTINGS[router.kind].follows_normalize_topk:
            out.append(f"router.normalize_topk=False: {fam.architecture} always renormalises "
                       "the top-k weights")  # fmt: skip
        else:
            out.append(f"router.kind={router.kind!r}: {fam.architecture} routes "
                       f"{' / '.join(kinds)} only ({why})")  # fmt: skip
    if router.eval_capacity_factor is not None:
        out.append(
            f"router.eval_capacity_factor={router.eval_capacity_factor}: capacity drops tokens "
            "in eval; a Hugging Face class runs every token (set it to null to export the "
            "dropless model)"
        )
    all_moe = all(model.is_moe_layer(i) for i in range(model.n_layers))
    if not fam.dense_layers and not all_moe:
        out.append(
            f"model.moe_every={model.moe_every}, first_dense={model.first_dense}: "
            f"{fam.architecture} has an MoE FFN in every layer"
        )
    if model.shared_experts and not fam.shared:
        out.append(
            f"model.shared_experts={model.shared_experts}: {fam.architecture} has no shared "
            "experts (Qwen2-MoE has them: --arch qwen2_moe, with qk_norm=none)"
        )
    if fam.dense_layers and model.moe_every == 0:
        out.append("model.moe_every=0: a dense model; export it as a dense class (not supported)")
    return out


def choose(model: ModelConfig, router: RouterConfig, arch: str | None = None) -> Family:
    """The family for this model: `arch` when given (an error naming every field it cannot
    hold), else the first of AUTO_ORDER that holds it exactly."""
    if arch is not None:
        if arch not in FAMILIES:
            raise HFExportError(f"--arch {arch!r}: choose one of {', '.join(FAMILIES)}")
        bad = family_refusals(FAMILIES[arch], model, router)
        if bad:
            raise HFExportError(
                f"{FAMILIES[arch].architecture} cannot hold this model exactly: "
                + "; ".join(bad)
                + f". {REMOTE}"
            )
        return FAMILIES[arch]
    reasons = {}
    for name in AUTO_ORDER:
        bad = family_refusals(FAMILIES[name], model, router)
        if not bad:
            return FAMILIES[name]
        reasons[name] = bad
    detail = " | ".join(f"{FAMILIES[n].architecture}: {'; '.join(r)}" for n, r in reasons.items())
    raise HFExportError(
        f"no stock Hugging Face class holds this model exactly ({detail}). {REMOTE}"
    )


def shared_hidden(model: ModelConfig) -> int:
    """The shared experts' hidden width H = shared_experts * shared_width (one FFN; Qwen2's
    shared_expert_intermediate_size), 0 without them."""
    return model.shared_experts * model.shared_width


def our_shapes(model: ModelConfig, router: RouterConfig) -> dict[Ref, tuple[int, ...]]:
    """Every tensor of the 1-process model (tied head left out), experts one Ref per global
    expert with its per-expert shape."""
    d, f, V = model.d_model, model.d_ff, model.vocab_size
    fe = model.expert_d_ff or model.d_ff
    h, g, dh = model.n_heads, model.kv_heads, model.head_width
    E = router.num_experts_for(model.num_experts)
    out: dict[Ref, tuple[int, ...]] = {Ref("tok_emb.weight"): (V, d), Ref("ln_f.weight"): (d,)}
    if not model.tie_embeddings:
        out[Ref("head.weight")] = (V, d)
    for i in range(model.n_layers):
        b = f"blocks.{i}."
        out[Ref(b + "ln1.weight")] = (d,)
        out[Ref(b + "ln2.weight")] = (d,)
        out[Ref(b + "attn.qkv.weight")] = ((h + 2 * g) * dh, d)
        out[Ref(b + "attn.proj.weight")] = (d, h * dh)
        if model.qk_norm == "head":
            out[Ref(b + "attn.q_norm.weight")] = (dh,)
            out[Ref(b + "attn.k_norm.weight")] = (dh,)
        if model.is_moe_layer(i):
            out[Ref(b + "ffn.router.gate.weight")] = (E, d)
            for e in range(E):
                out[Ref(b + "ffn.experts.w_in", e)] = (d, 2 * fe)
                out[Ref(b + "ffn.experts.w_out", e)] = (fe, d)
            if model.shared_experts:  # SharedExperts: w_in [2H, d] (gate; up), w_out [d, H]
                H = shared_hidden(model)
                out[Ref(b + "ffn.shared.w_in")] = (2 * H, d)
                out[Ref(b + "ffn.shared.w_out")] = (d, H)
                if model.shared_gate:
                    out[Ref(b + "ffn.shared.w_gate")] = (1, d)
        else:
            out[Ref(b + "ffn.w_in.weight")] = (2 * f, d)
            out[Ref(b + "ffn.w_out.weight")] = (d, f)
    return out


def conversion(fam: Family, model: ModelConfig, router: RouterConfig) -> Conversion:
    """The pieces of `fam` for this config (HF name -> our region), not yet checked."""
    shapes = our_shapes(model, router)
    conv = Conversion(fam.architecture)
    d, f = model.d_model, model.d_ff
    fe = model.expert_d_ff or model.d_ff
    q, kv = model.n_heads * model.head_width, model.kv_heads * model.head_width
    E = router.num_experts_for(model.num_experts)

    def add(hf: str, name: str, expert: int | None = None, **kw: Any) -> None:
        ref = Ref(name, expert)
        conv.add(hf, ref, shapes[ref], **kw)

    add("model.embed_tokens.weight", "tok_emb.weight")
    add("model.norm.weight", "ln_f.weight")
    if not model.tie_embeddings:
        add("lm_head.weight", "head.weight")
    for i in range(model.n_layers):
        b, L = f"blocks.{i}.", f"model.layers.{i}."
        add(L + "input_layernorm.weight", b + "ln1.weight")
        add(L + "post_attention_layernorm.weight", b + "ln2.weight")
        add(L + "self_attn.q_proj.weight", b + "attn.qkv.weight", rows=(0, q))
        add(L + "self_attn.k_proj.weight", b + "attn.qkv.weight", rows=(q, q + kv))
        add(L + "self_attn.v_proj.weight", b + "attn.qkv.weight", rows=(q + kv, q + 2 * kv))
        add(L + "self_attn.o_proj.weight", b + "attn.proj.weight")
        if model.qk_norm == "head":
            add(L + "self_attn.q_norm.weight", b + "attn.q_norm.weight")
            add(L + "self_attn.k_norm.weight", b + "attn.k_norm.weight")
        if not model.is_moe_layer(i):
            add(L + "mlp.gate_proj.weight", b + "ffn.w_in.weight", rows=(0, f))
            add(L + "mlp.up_proj.weight", b + "ffn.w_in.weight", rows=(f, 2 * f))
            add(L + "mlp.down_proj.weight", b + "ffn.w_out.weight")
            continue
        m = L + fam.moe + "."
        add(m + "gate.weight", b + "ffn.router.gate.weight")
        gate, up, down = fam.experts
        for e in range(E):  # ours [in, out] -> HF nn.Linear [out, in]: transposed
            x = f"{m}experts.{e}."
            add(x + gate + ".weight", b + "ffn.experts.w_in", e, cols=(0, fe), transpose=True)
            add(x + up + ".weight", b + "ffn.experts.w_in", e, cols=(fe, 2 * fe), transpose=True)
            add(x + down + ".weight", b + "ffn.experts.w_out", e, transpose=True)
        s = m + "shared_expert."
        if fam.shared and model.shared_experts:  # nn.Linear [out, in], as ours: no transpose
            H = shared_hidden(model)
            add(s + "gate_proj.weight", b + "ffn.shared.w_in", rows=(0, H))
            add(s + "up_proj.weight", b + "ffn.shared.w_in", rows=(H, 2 * H))
            if model.shared_gate:  # sigmoid(x . w_gate) * shared(x): Qwen2's own formula
                add(s + "down_proj.weight", b + "ffn.shared.w_out")
                add(m + "shared_expert_gate.weight", b + "ffn.shared.w_gate")
            else:  # Qwen2 always gates: a zero gate is sigmoid(0) = 1/2 exactly, so down_proj
                add(s + "down_proj.weight", b + "ffn.shared.w_out", scale=2.0)  # is 2 w_out
                conv.add_zero(m + "shared_expert_gate.weight", (1, d))
        elif fam.shared:  # Qwen2-MoE always has a shared expert: an empty one adds 0 exactly
            conv.add_zero(m + "shared_expert.gate_proj.weight", (0, d))
            conv.add_zero(m + "shared_expert.up_proj.weight", (0, d))
            conv.add_zero(m + "shared_expert.down_proj.weight", (d, 0))
            conv.add_zero(m + "shared_expert_gate.weight", (1, d))
    conv.check(shapes)
    return conv


def hf_config(
    fam: Family, model: ModelConfig, router: RouterConfig, eos_id: int, bos_id: int
) -> dict[str, Any]:
    """config.json of `fam` for this model: every field its class reads, none left at a default
    that differs from what was trained (jitter 0, no sliding window, the token ids)."""
    moe_layers = [i for i in range(model.n_layers) if model.is_moe_layer(i)]
    fe = model.expert_d_ff or model.d_ff
    topk = int(router.experts_per_token())  # switch: 1
    cfg: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_width,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,  # transformers v4 and vLLM read this
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},  # v5
        "tie_word_embeddings": model.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": model.init_std,
        "sliding_window": None,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "num_experts_per_tok": topk,
        fam.experts_field: model.num_experts,
        "output_router_logits": False,
        "dtype": "float32",
    }
    if fam.name == "mixtral":
        cfg |= {"intermediate_size": fe, "router_jitter_noise": 0.0}
    else:
        dense = [i for i in range(model.n_layers) if i not in moe_layers]
        cfg |= {
            "intermediate_size": model.d_ff,
            "moe_intermediate_size": fe,
            "norm_topk_prob": renormalised(router),
            "decoder_sparse_step": max(model.moe_every, 1),
            # the dense layers decoder_sparse_step alone does not make dense (first_dense)
            "mlp_only_layers": [i for i in dense if (i + 1) % max(model.moe_every, 1) == 0],
            "use_sliding_window": False,
            "max_window_layers": model.n_layers,
            "attention_bias": False,
        }
    if fam.name == "qwen2_moe":
        cfg |= {"qkv_bias": False, "shared_expert_intermediate_size": shared_hidden(model)}
    return cfg

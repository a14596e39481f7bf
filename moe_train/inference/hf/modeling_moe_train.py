"""moe-train's language model as Hugging Face remote code: one file, torch + transformers only.

`moe-train-export RUN --format hf-remote` copies this file next to config.json and
model.safetensors, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

computes what moe-train's eval forward computes (dropless, no router noise), with no moe-train
installed. Tensor names are moe-train's own under `model.` (the head: `lm_head.weight`); the
experts keep moe-train's stacked 3-D layout.

Shapes: B batch, T tokens, N = B*T, d hidden_size, h query heads, g key/value heads, dh head_dim,
f intermediate width, E experts, k expert slots per token, V vocab_size.

Bodies: the modern one (RMSNorm, RoPE in the rotate-half layout, grouped-query attention,
optional per-head qk-norm, SwiGLU) and GPT-2's (LayerNorm with bias, learned positions, GELU).
Routers (`router_kind`): switch, topk (softmax or sigmoid scores, group-limited, balancing bias,
route scale), prototype (k top-1), sam (switch-and-mixture) and tree (bit-pattern tree gating).
Every one routes each token on its own, so the model is causal and a KV cache is exact. Router
math runs in float32, ties go to the lowest expert id (as in moe-train).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_init: Any = nn.init
try:  # transformers v5: initialisers that leave loaded tensors alone
    from transformers import initialization

    _init = initialization
except ImportError:  # pragma: no cover - older transformers
    pass

ROUTERS = ("switch", "topk", "prototype", "sam", "tree")


class MoETrainConfig(PretrainedConfig):
    """A moe-train model: HF's names for the shape, moe-train's for the body and the router."""

    model_type = "moe_train"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"rms_norm_eps": "norm_eps"}

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        head_dim: int = 32,
        intermediate_size: int = 512,  # the dense FFNs' width
        moe_intermediate_size: int = 512,  # the experts' width
        num_experts: int = 8,  # experts per MoE layer
        num_experts_per_tok: int = 1,  # expert slots per token (switch 1, tree depth + 1)
        moe_every: int = 2,  # layer i is MoE when (i + 1) % moe_every == 0 and i >= first_dense
        first_dense: int = 0,
        shared_experts: int = 0,  # always-on experts, one FFN of shared_experts * width
        shared_intermediate_size: int = 512,  # the width of one shared expert
        shared_gate: bool = False,  # scale the shared output by sigmoid(x . w_gate)
        activation: str = "swiglu",  # swiglu | gelu (tanh)
        norm: str = "rmsnorm",  # rmsnorm | layernorm
        norm_eps: float = 1e-5,
        position: str = "rope",  # rope | learned
        rope_theta: float = 10000.0,
        qk_norm: str = "none",  # none | head
        max_position_embeddings: int = 128,
        tie_word_embeddings: bool = True,
        router_kind: str = "switch",
        router_top_k: int = 2,  # topk / sam: experts per token; prototype: prototypes
        router_num_groups: int = 1,  # sam: device groups; topk: groups of topk_groups
        router_topk_groups: int | None = None,
        router_score: str = "softmax",  # topk: softmax | sigmoid
        router_normalize_topk: bool = True,
        router_route_scale: float = 1.0,
        router_score_bias: bool = False,  # topk: a balancing bias [E] adds to the choice
        router_tree_depth: int = 2,
        router_tree_gate: str = "straight_through",  # tree: weight 1 per node, or sigmoid
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.intermediate_size, self.moe_intermediate_size = (
            intermediate_size,
            moe_intermediate_size,
        )
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_every, self.first_dense = moe_every, first_dense
        self.shared_experts, self.shared_intermediate_size = (
            shared_experts,
            shared_intermediate_size,
        )
        self.shared_gate = shared_gate
        self.activation, self.norm, self.norm_eps = activation, norm, norm_eps
        self.position, self.rope_theta, self.qk_norm = position, rope_theta, qk_norm
        self.max_position_embeddings = max_position_embeddings
        self.router_kind, self.router_top_k = router_kind, router_top_k
        self.router_num_groups, self.router_topk_groups = router_num_groups, router_topk_groups
        self.router_score, self.router_normalize_topk = router_score, router_normalize_topk
        self.router_route_scale, self.router_score_bias = router_route_scale, router_score_bias
        self.router_tree_depth, self.router_tree_gate = router_tree_depth, router_tree_gate
        self.initializer_range, self.use_cache = initializer_range, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)  # type: ignore[call-arg]
        if router_kind not in ROUTERS:
            raise ValueError(f"router_kind={router_kind!r}: this file routes {', '.join(ROUTERS)}")

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every > 0 and i >= self.first_dense and (i + 1) % self.moe_every == 0


# ---- small pieces ---------------------------------------------------------------------------


def _field(cls: type) -> str:
    """The output dataclass' name for the cache (`cache` in newer transformers)."""
    fields = getattr(cls, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [.., k] of the k largest of x [.., n], ties to the lowest index."""
    values, index = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def activate(h: Tensor, activation: str) -> Tensor:
    """swiglu: silu(gate) * up over h's halves [.., 2f] -> [.., f]; gelu: GELU (tanh)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), normalised in float32, cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def build_norm(config: MoETrainConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def rope(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """(cos, sin) [B, T, dh] float32 at position_ids [B, T] (rotate-half layout)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (exponents.float() / head_dim))  # [dh / 2]
    angle = position_ids.float()[..., None] * inv_freq  # [B, T, dh / 2]
    angle = torch.cat((angle, angle), dim=-1)
    return angle.cos(), angle.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """q [B, h, T, dh], k, v [B, g, S, dh]; mask [B, 1, T, S] (bool: True attends, or
    additive) or None (causal) -> ([B, T, h, dh], weights [B, h, T, S])."""
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, h, T, S]
    if attention_mask is None:  # causal, the queries being the last T positions
        T, S = scores.shape[-2:]
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


_MASK_ARGS = inspect.signature(create_causal_mask).parameters


def causal_mask(
    config: MoETrainConfig,
    embeds: Tensor,
    attention_mask: Tensor | None,
    cache: Cache | None,
    position_ids: Tensor,
) -> Any:
    """transformers' causal mask for the attention implementation in use (any v5 signature)."""
    kw: dict[str, Any] = {"config": config, "inputs_embeds": embeds,
                          "attention_mask": attention_mask, "position_ids": position_ids}  # fmt: skip
    kw["cache" if "cache" in _MASK_ARGS else "past_key_values"] = cache
    if "cache_position" in _MASK_ARGS:
        past = cache.get_seq_length() if cache is not None else 0
        kw["cache_position"] = torch.arange(past, past + embeds.shape[1], device=embeds.device)
    return create_causal_mask(**kw)


# ---- attention ------------------------------------------------------------------------------


class MoETrainAttention(nn.Module):
    """Causal attention, h query and g key/value heads (query head j reads kv head j // (h/g)).

    qkv: [(h + 2g) dh, d], rows q (h heads), k (g), v (g); proj: [d, h dh]; qk_norm "head":
    RMSNorm over dh on each q and k head, before RoPE. The attention itself is transformers'
    (ALL_ATTENTION_FUNCTIONS[config._attn_implementation]; eager_attention for "eager")."""

    def __init__(self, config: MoETrainConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.h, self.g, self.dh = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_key_value_groups = self.h // self.g
        self.scaling = self.dh**-0.5
        self.is_causal = True
        d = config.hidden_size
        self.qkv = nn.Linear(d, (self.h + 2 * self.g) * self.dh, bias=False)
        self.proj = nn.Linear(self.h * self.dh, d, bias=False)
        self.q_norm = RMSNorm(self.dh, config.norm_eps) if config.qk_norm == "head" else None
        self.k_norm = RMSNorm(self.dh, config.norm_eps) if config.qk_norm == "head" else None

    def forward(
        self,
        x: Tensor,
        rope_cos_sin: tuple[Tensor, Tensor] | None,
        attention_mask: Any,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> Tensor:
        B, T, _ = x.shape
        h, g, dh = self.h, self.g, self.dh
        q, k, v = self.qkv(x).view(B, T, h + 2 * g, dh).split((h, g, g), dim=2)  # [B, T, ., dh]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope_cos_sin is not None:
            cos, sin = (t.to(x.dtype).unsqueeze(-2) for t in rope_cos_sin)  # [B, T, 1, dh]
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, dh]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, g, past + T, dh]
        impl = self.config._attn_implementation
        attend = eager_attention if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        y, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.proj(y.reshape(B, T, h * dh))  # y: [B, T, h, dh]


# ---- feed-forward: dense, experts, router ---------------------------------------------------


class MoETrainDenseFFN(nn.Module):
    """w_out(act(w_in x)): w_in [W, d] (W = 2f for swiglu: gate rows, then up), w_out [d, f]."""

    def __init__(self, config: MoETrainConfig):
        super().__init__()
        f, self.activation = config.intermediate_size, config.activation
        width = 2 * f if config.activation == "swiglu" else f
        self.w_in = nn.Linear(config.hidden_size, width, bias=False)
        self.w_out = nn.Linear(f, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class MoETrainExperts(nn.Module):
    """E expert FFNs as 3-D parameters, moe-train's layout ([in, out]: x @ w_in[e]):
    w_in [E, d, W] (W = 2f for swiglu: gate columns, then up), w_out [E, f, d].

    forward(hidden_states [N, d], top_k_index [N, k], top_k_weights [N, k]) -> [N, d]:
    sum over a token's slots of weight * expert(x) (transformers v5's experts call)."""

    def __init__(self, config: MoETrainConfig):
        super().__init__()
        E, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.activation = E, config.activation
        width = 2 * f if config.activation == "swiglu" else f
        self.w_in = nn.Parameter(torch.empty(E, d, width))
        self.w_out = nn.Parameter(torch.empty(E, f, d))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == e)  # [n] each
            x = hidden_states[token]
            y = activate(x @ self.w_in[e].to(x.dtype), self.activation) @ self.w_out[e].to(x.dtype)
            out.index_add_(0, token, y * top_k_weights[token, slot, None].to(y.dtype))
        return out


class MoETrainSharedExperts(nn.Module):
    """Always-on experts as one FFN of width H: w_in [W, d] (W = 2H for swiglu), w_out [d, H],
    optional w_gate [1, d] scaling the output by sigmoid(x . w_gate)."""

    def __init__(self, config: MoETrainConfig):
        super().__init__()
        H, d = config.shared_experts * config.shared_intermediate_size, config.hidden_size
        self.activation = config.activation
        self.w_in = nn.Parameter(torch.empty(2 * H if config.activation == "swiglu" else H, d))
        self.w_out = nn.Parameter(torch.empty(d, H))
        self.w_gate = nn.Parameter(torch.empty(1, d)) if config.shared_gate else None

    def forward(self, x: Tensor) -> Tensor:
        y = activate(x @ self.w_in.to(x.dtype).t(), self.activation) @ self.w_out.to(x.dtype).t()
        if self.w_gate is not None:
            y = y * torch.sigmoid(x @ self.w_gate.to(x.dtype).t())
        return y


class MoETrainRouter(nn.Module):
    """x [N, d] -> (top_k_index [N, k] int64, top_k_weights [N, k] float32), in float32.

    gate: [U, d] (+ bias [U] for sam); U = E, or tree_depth for the tree. score_bias [E]: topk's
    balancing bias (added to the scores that choose, never to the weights)."""

    def __init__(self, config: MoETrainConfig):
        super().__init__()
        self.config = config
        router_kind, E = config.router_kind, config.num_experts
        units = config.router_tree_depth if router_kind == "tree" else E
        self.gate = nn.Linear(config.hidden_size, units, bias=router_kind == "sam")
        self.score_bias: Tensor | None
        self.register_buffer("score_bias", torch.zeros(E) if config.router_score_bias else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        bias = None if self.gate.bias is None else self.gate.bias.float()
        logits = F.linear(x.float(), self.gate.weight.float(), bias)  # [N, U]
        N, k = logits.shape[0], c.router_top_k
        if c.router_kind == "switch":  # argmax of softmax, weight its probability
            weight, index = torch.softmax(logits, dim=-1).max(dim=-1, keepdim=True)
        elif c.router_kind == "topk":
            index, weight = self._topk(logits)
        elif c.router_kind == "prototype":  # k prototypes of E/k experts: top-1 in each
            n = logits.shape[1] // k
            weight, local = torch.softmax(logits.view(N, k, n), dim=-1).max(dim=-1)
            index = local + torch.arange(k, device=x.device) * n
        elif c.router_kind == "sam":  # the best group by summed probability, top-k inside
            G = c.router_num_groups
            probs = torch.softmax(logits, dim=-1).view(N, G, -1)  # [N, G, n]
            group = top_k(probs.sum(dim=-1), 1)[1]  # [N, 1]
            inside = probs.gather(1, group[..., None].expand(N, 1, probs.shape[2]))[:, 0]
            weight, local = top_k(inside, k)  # [N, k]
            index = group * probs.shape[2] + local
        else:  # tree: sign bits of the depth units pick a root-to-leaf path (heap order)
            bits = (logits > 0).long()  # [N, D]
            nodes = [torch.zeros(N, dtype=torch.long, device=x.device)]
            for level in range(bits.shape[1]):
                nodes.append(2 * nodes[-1] + 1 + bits[:, level])
            index = torch.stack(nodes, dim=1)  # [N, D + 1]
            weight = torch.ones(index.shape, device=x.device)
            if c.router_tree_gate == "sigmoid":  # the root 1, then the branch probabilities
                branch = torch.sigmoid(torch.where(bits.bool(), logits, -logits))
                weight = torch.cat([weight[:, :1], branch], dim=1)
        return index, weight

    def _topk(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        scores = torch.sigmoid(logits) if c.router_score == "sigmoid" else logits.softmax(-1)
        choice = scores if self.score_bias is None else scores + self.score_bias.float()
        if c.router_topk_groups is not None:  # keep the best groups by their top-2 sum
            N, E = choice.shape
            G = c.router_num_groups
            grouped = choice.view(N, G, E // G)
            group_score = top_k(grouped, min(2, E // G))[0].sum(dim=-1)  # [N, G]
            keep = top_k(group_score, c.router_topk_groups)[1]
            inside = torch.zeros(N, G, dtype=torch.bool, device=choice.device)
            inside = inside.scatter(1, keep, True).repeat_interleave(E // G, dim=1)
            choice = choice.masked_fill(~inside, float("-inf"))
        index = top_k(choice, c.router_top_k)[1]
        weight = scores.gather(1, index)
        if c.router_normalize_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        if c.router_route_scale != 1.0:
            weight = weight * c.router_route_scale
        return index, weight


class MoETrainMoE(nn.Module):
    """x [B, T, d] -> [B, T, d]: each token through its routed experts (+ the shared ones)."""

    def __init__(self, config: MoETrainConfig):
        super().__init__()
        self.router = MoETrainRouter(config)
        self.experts = MoETrainExperts(config)
        self.shared = MoETrainSharedExperts(config) if config.shared_experts else None

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # [N, d]
        index, weight = self.router(tokens)
        y = self.experts(tokens, index, weight)
        if self.shared is not None:
            y = y + self.shared(tokens)
        return y.reshape(x.shape)


class MoETrainBlock(nn.Module):
    """Pre-norm: x += attn(ln1(x)); x += ffn(ln2(x))."""

    def __init__(self, config: MoETrainConfig, layer_idx: int):
        super().__init__()
        self.ln1 = build_norm(config, config.hidden_size)
        self.attn = MoETrainAttention(config, layer_idx)
        self.ln2 = build_norm(config, config.hidden_size)
        moe = config.is_moe_layer(layer_idx)
        self.ffn = MoETrainMoE(config) if moe else MoETrainDenseFFN(config)

    def forward(self, x: Tensor, rope_cos_sin: Any, mask: Any, cache: Any, **kwargs: Any) -> Tensor:
        x = x + self.attn(self.ln1(x), rope_cos_sin, mask, cache, **kwargs)
        return x + self.ffn(self.ln2(x))


# ---- the models -----------------------------------------------------------------------------


class MoETrainPreTrainedModel(PreTrainedModel):
    config: MoETrainConfig
    config_class = MoETrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoETrainBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # the router's gate stays float32 in a bf16/fp16 model (moe-train's selective precision)
    _keep_in_fp32_modules = ["router"]
    _keep_in_fp32_modules_strict = ["router"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, (MoETrainExperts, MoETrainSharedExperts)):
            for p in module.parameters(recurse=False):
                _init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, MoETrainRouter) and module.score_bias is not None:
            _init.zeros_(module.score_bias)


class MoETrainModel(MoETrainPreTrainedModel):
    """input_ids [B, T] -> hidden states [B, T, d] (after ln_f)."""

    def __init__(self, config: MoETrainConfig):
        super().__init__(config)
        d = config.hidden_size
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = None
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.max_position_embeddings, d)
        self.blocks = nn.ModuleList(
            MoETrainBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.ln_f = build_norm(config, d)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.tok_emb = value  # type: ignore[assignment]

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # pragma: no cover - older transformers
                cache = DynamicCache()
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, d]
        if position_ids is None:  # the positions after the cached ones
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
        position_ids = position_ids.expand(x.shape[0], -1)  # [B, T]
        mask = causal_mask(self.config, x, attention_mask, cache, position_ids)
        rope_cos_sin = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        else:
            rope_cos_sin = rope(position_ids, self.config.head_dim, self.config.rope_theta)
        for block in self.blocks:
            x = block(x, rope_cos_sin, mask, cache, **kwargs)
        out = {"last_hidden_state": self.ln_f(x), _field(BaseModelOutputWithPast): cache}
        return BaseModelOutputWithPast(**out)


class MoETrainForCausalLM(MoETrainPreTrainedModel, GenerationMixin):
    """logits [B, T, V] = lm_head(MoETrainModel(input_ids)); lm_head is tok_emb when tied."""

    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: MoETrainConfig):
        super().__init__(config)
        self.model = MoETrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_emb = value  # type: ignore[assignment]

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value  # type: ignore[assignment]

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        base = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = base.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = None
        if labels is not None:  # next-token cross entropy, -100 ignored
            V = logits.shape[-1]
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        cache_out = getattr(base, _field(BaseModelOutputWithPast))
        out = {"loss": loss, "logits": logits, _field(CausalLMOutputWithPast): cache_out}
        return CausalLMOutputWithPast(**out)


__all__ = ["MoETrainConfig", "MoETrainForCausalLM", "MoETrainModel", "MoETrainPreTrainedModel"]

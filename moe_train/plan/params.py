"""Closed-form parameter count of MoETransformer (decoder-only) or a T5-style encoder-decoder.

The router's share (gate width, bias, experts per layer) comes from its class in the router
registry; nothing here depends on the router kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..experts import shared_expert_params
from ..routing import router_class
from .config import ARCHITECTURES, EncDecConfig


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
    shared: int = 0  # shared experts of all MoE layers (dense: data-parallel, always active)

    @property
    def dense(self) -> int:
        return (
            self.embedding + self.attention + self.norms + self.dense_ffn + self.router
            + self.shared
        )  # fmt: skip

    @property
    def total(self) -> int:
        return self.dense + self.experts

    def active_expert(self, k: float) -> float:
        return k * self.expert_size * self.moe_layers

    def active(self, k: float) -> float:
        return self.dense + self.active_expert(k)


def ffn_mult(activation: str) -> int:
    """Weight matrices of one FFN's input side: swiglu has gate and up, gelu one."""
    return 3 if activation == "swiglu" else 2


def attention_widths(model: Any) -> tuple[int, int]:
    """(query width h * dh, key/value width kv * dh) of MoETransformer's attention."""
    h = model.n_heads
    dh = getattr(model, "head_dim", None) or model.d_model // h
    kv = getattr(model, "n_kv_heads", None) or h
    return h * dh, kv * dh


def _decoder_terms(model: Any) -> dict[str, int]:
    """MoETransformer: bias-free qkv [d, q + 2 kv] + proj [q, d] (GQA, head_dim); RMSNorm (a
    weight) or LayerNorm (weight and bias), two per block + final, + qk-norm's two [dh] per
    layer; a position table only for learned positions (RoPE has none)."""
    d, V, L = model.d_model, model.vocab_size, model.n_layers
    q, kv = attention_widths(model)
    untied = 0 if model.tie_embeddings else V * d
    positions = model.seq_len * d if getattr(model, "position", "learned") == "learned" else 0
    per_norm = d if getattr(model, "norm", "layernorm") == "rmsnorm" else 2 * d
    qk_norm = 2 * (q // model.n_heads) if getattr(model, "qk_norm", "none") == "head" else 0
    return {
        "layers": L,
        "moe_layers": sum(model.is_moe_layer(i) for i in range(L)),
        "embedding": V * d + positions + untied,
        "attention": L * (d * (q + 2 * kv) + q * d),  # qkv + proj
        "norms": (2 * L + 1) * per_norm + L * qk_norm,
        "lookup_only": positions + untied,
    }


def _encdec_terms(model: Any, ed: EncDecConfig) -> dict[str, int]:
    """T5 / Switch: relative position bias, RMSNorm (or LayerNorm), cross attention."""
    d, V, L, h = model.d_model, model.vocab_size, model.n_layers, model.n_heads
    n_enc = ed.encoder_layers if ed.encoder_layers is not None else L // 2
    n_dec = L - n_enc
    if not 0 < n_enc < L:
        raise ValueError(
            f"plan.encoder_decoder.encoder_layers: must be in [1, {L - 1}], got {n_enc}"
        )
    inner = h * (ed.d_kv or d // h)  # attention width: heads x d_kv
    rel = 2 * ed.relative_buckets * h  # one relative-bias table per stack
    norm = d if ed.rms_norm else 2 * d
    moe = sum(model.is_moe_layer(i) for i in range(n_enc))
    moe += sum(model.is_moe_layer(i) for i in range(n_dec))
    return {
        "layers": n_enc + n_dec,
        "moe_layers": moe,
        "embedding": V * d * (1 if ed.tie_embeddings else 2),
        "attention": (n_enc * 4 + n_dec * 8) * d * inner + rel,  # decoder: self + cross
        "norms": (2 * n_enc + 3 * n_dec + 2) * norm,  # + final norm of each stack
        "lookup_only": rel + (V * d if not ed.tie_embeddings else 0),
    }


def count_params(
    model: Any, router: Any, architecture: str = "decoder_only", encdec: EncDecConfig | None = None
) -> ParamCount:
    """Closed-form parameter count of MoETransformer (decoder_only) or a T5-style encoder-decoder."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"plan.architecture: got {architecture!r}; allowed: {', '.join(ARCHITECTURES)}"
        )
    if architecture == "decoder_only":
        terms = _decoder_terms(model)
    else:
        terms = _encdec_terms(model, encdec or EncDecConfig())
    d, moe = model.d_model, terms["moe_layers"]
    cls = router_class(router.kind)
    E = cls.num_experts_for(router, model.num_experts)
    expert_size = d * (model.expert_d_ff or model.d_ff) * ffn_mult(model.activation)
    return ParamCount(
        embedding=terms["embedding"],
        attention=terms["attention"],
        norms=terms["norms"],
        dense_ffn=(terms["layers"] - moe) * d * model.d_ff * ffn_mult(model.activation),
        router=moe * cls.gate_params(router, d, E),
        experts=moe * E * expert_size,
        moe_layers=moe,
        experts_per_layer=E,
        expert_size=expert_size,
        lookup_only=terms["lookup_only"],
        shared=moe * shared_params(model),
    )


def shared_params(model: Any) -> int:
    """One MoE layer's shared experts (model.shared_experts of width shared_width, its gate)."""
    count = getattr(model, "shared_experts", 0)
    if not count:
        return 0
    return shared_expert_params(
        model.d_model, model.shared_width, count, model.activation, model.shared_gate
    )

"""ModelConfig: the LM's shape and body (norms, positions, attention heads, FFN, layer pattern).

Two bodies are named here: the modern one (the default: RMSNorm, rotary positions, SwiGLU, grouped
query attention, as Llama / Mixtral / Qwen3-MoE) and GPT-2's (LayerNorm with bias, learned
absolute positions, GELU, multi-head attention), which every run made before the body options
existed was trained with. A saved config (a run folder's config.yaml, an export's config.json)
that lacks a body field predates it and means that field's LEGACY_BODY value: `with_legacy_body`
fills them in, so an old run never loads silently as the new default body.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..experts import ACTIVATIONS
from ..validation import above, at_least, check_finite, in_range, one_of

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
QK_NORMS = ("none", "head")

# The body fields and the value a run trained before each existed had (the GPT-2 body). A saved
# model config without a key takes it from here (with_legacy_body), never from the defaults.
LEGACY_BODY: dict[str, Any] = {
    "norm": "layernorm",
    "norm_eps": 1e-5,
    "position": "learned",
    "rope_theta": 10000.0,
    "n_kv_heads": None,
    "head_dim": None,
    "qk_norm": "none",
    "activation": "gelu",
    "first_dense": 0,
}
# The same body as `moe-train` overrides (the old default model: add model.d_ff=256 for its size)
LEGACY_OVERRIDES = (
    "model.norm=layernorm",
    "model.position=learned",
    "model.activation=gelu",
    "model.n_kv_heads=null",
)


def with_legacy_body(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved model config (a dict) with every body field it lacks set to the value the run
    was trained with: LEGACY_BODY's (the field did not exist when it was written)."""
    return {**{k: v for k, v in LEGACY_BODY.items() if k not in saved}, **saved}


@dataclass
class ModelConfig:
    """Shape and body of the LM. num_experts is global (all ranks together)."""

    vocab_size: int = 256  # token ids are in [0, vocab_size)
    seq_len: int = 128  # tokens per training window (T); the longest context
    d_model: int = 128  # width of the residual stream (d)
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # query heads (h)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); null = n_heads (MHA)
    head_dim: int | None = None  # width of one head; null = d_model / n_heads
    d_ff: int = 512  # hidden width of the dense FFNs (and of the experts unless expert_d_ff)
    num_experts: int = 8  # experts per MoE layer, over all ranks (E)
    expert_d_ff: int | None = None  # None = d_ff
    moe_every: int = 2  # layer i is MoE when (i + 1) % moe_every == 0 and i >= first_dense; 0: none
    first_dense: int = 0  # the first k layers are dense whatever moe_every says (DeepSeek-V3, Kimi)
    shared_experts: int = 0  # always-on dense experts in each MoE layer (DeepSeekMoE); 0 = none
    shared_d_ff: int | None = None  # hidden width of one shared expert; null = the experts' width
    shared_gate: bool = False  # scale the shared output by sigmoid(w x) per token (Qwen2-MoE)
    activation: str = "swiglu"  # swiglu | gelu, in the dense FFNs and the experts
    norm: str = "rmsnorm"  # rmsnorm (weight only, in float32) | layernorm (weight and bias)
    norm_eps: float = 1e-5  # epsilon of every norm (RMSNorm: added to the mean square)
    position: str = "rope"  # rope (rotary, rotate-half as HF Llama/Qwen) | learned (a table)
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2i/head_dim)
    qk_norm: str = "none"  # none | head (Qwen3: RMSNorm over head_dim on each q and k head)
    dropout: float = 0.0  # dropout on attention and residual branches (0 = off)
    init_std: float = 0.02  # std of the normal init (output projections: / sqrt(2 n_layers))
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix

    @property
    def output_init_std(self) -> float:
        """std of the output projections (attention, FFN and experts' w_out): GPT-2's
        init_std / sqrt(2 n_layers), one per residual branch."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    @property
    def shared_width(self) -> int:
        """Hidden width of one shared expert (shared_d_ff, else expert_d_ff, else d_ff)."""
        return self.shared_d_ff or self.expert_d_ff or self.d_ff

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_heads, or n_heads when null)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_width(self) -> int:
        """Width of one attention head (head_dim, or d_model / n_heads when null)."""
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Layer i is MoE when i >= first_dense and (i + 1) % moe_every == 0: HF Qwen2/3-MoE's
        decoder_sparse_step with mlp_only_layers = [0, first_dense)."""
        return self.moe_every > 0 and i >= self.first_dense and (i + 1) % self.moe_every == 0

    def validate(self) -> None:
        check_finite(self, "model")
        at_least(self, "model", 1, "vocab_size", "seq_len", "d_model", "n_layers", "n_heads")
        at_least(self, "model", 1, "d_ff", "num_experts")
        at_least(self, "model", 1, "expert_d_ff", "n_kv_heads", "head_dim", optional=True)
        at_least(self, "model", 0, "shared_experts")
        at_least(self, "model", 1, "shared_d_ff", optional=True)
        at_least(self, "model", 0, "moe_every", "first_dense")  # moe_every 0 = dense model
        one_of(self, "model", "activation", ACTIVATIONS)
        one_of(self, "model", "norm", NORMS)
        one_of(self, "model", "position", POSITIONS)
        one_of(self, "model", "qk_norm", QK_NORMS)
        above(self, "model", 0, "norm_eps", "rope_theta", "init_std")
        in_range(self, "model", 0, 1, "dropout")
        self._check_heads()
        if self.first_dense > self.n_layers:
            raise ValueError(
                f"model.first_dense: {self.first_dense} dense layers of n_layers={self.n_layers}; "
                f"use at most {self.n_layers}"
            )

    def _check_heads(self) -> None:
        h, kv = self.n_heads, self.kv_heads
        if self.head_dim is None and self.d_model % h:
            raise ValueError(
                f"model.n_heads: d_model={self.d_model} is not divisible by n_heads={h}; "
                "choose n_heads that divides d_model, or set model.head_dim"
            )
        if h % kv:
            raise ValueError(
                f"model.n_kv_heads: n_heads={h} is not a multiple of n_kv_heads={kv}; each "
                "key/value head serves a whole group of query heads (use a divisor of n_heads)"
            )
        if self.position == "rope" and self.head_width % 2:
            raise ValueError(
                f"model.head_dim: rope rotates pairs of channels, so the head width must be "
                f"even, got {self.head_width} (d_model / n_heads when head_dim is null); set "
                "model.head_dim to an even width or use model.position=learned"
            )

    def body(self) -> dict[str, Any]:
        """The body fields and their values (LEGACY_BODY's keys), e.g. for a summary."""
        return {k: getattr(self, k) for k in LEGACY_BODY}

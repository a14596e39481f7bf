"""Causal self-attention with grouped-query heads, optional per-head qk-norm and RoPE, and the
KV cache of incremental decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .params import Linear, RMSNorm
from .rope import apply_rope


class LayerKV:
    """One layer's cached keys and values [B, kv_heads, seq_len, dh], allocated on first use (in
    the dtype the attention computes in). Keys are cached after RoPE (at their positions)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v [B, kv, T, dh] at positions pos..pos+T-1; all keys/values up to pos+T."""
        if self.k is None or self.v is None:
            B, h, _, dh = k.shape
            self.k = k.new_zeros(B, h, self.max_len, dh)
            self.v = v.new_zeros(B, h, self.max_len, dh)
        T = k.shape[2]
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]


class KVCache:
    """Keys and values of every layer for incremental decoding: `model(idx, cache=cache)` runs
    idx's T tokens at positions `cache.length`.., attends to everything cached before them, and
    advances `length` by T. Holds at most model.seq_len positions (moe_train.generate slides the
    window when it is full: moe_train/inference/generate.py)."""

    def __init__(self, cfg: ModelConfig):
        self.max_len = cfg.seq_len
        self.layers = [LayerKV(cfg.seq_len) for _ in range(cfg.n_layers)]
        self.length = 0


class Attention(nn.Module):
    """x [B, T, d] -> [B, T, d]: h query heads and kv key/value heads of width dh (h % kv == 0;
    each key/value head serves h / kv query heads), causal softmax attention scaled 1/sqrt(dh).

    qkv: one bias-free Linear d -> (h + 2 kv) dh, rows q (h heads), k (kv heads), v (kv heads),
    each head dh consecutive rows (with kv = h and dh = d / h: GPT-2's fused qkv); proj: h dh -> d.
    qk_norm "head": RMSNorm over dh on every q and k head (own weights for q and k), before RoPE.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_width
        self.dropout = cfg.dropout
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv = Linear(cfg.d_model, width, cfg.init_std)
        self.proj = Linear(self.n_heads * self.head_dim, cfg.d_model, cfg.output_init_std)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(
        self,
        x: Tensor,
        kv: LayerKV | None = None,
        pos: int = 0,
        rope: tuple[Tensor, Tensor] | None = None,
        doc_mask: Tensor | None = None,
    ) -> Tensor:
        """x: [B, T, d] -> [B, T, d]; rope: (cos, sin) [T, dh] (or [B, T, dh]) of x's positions,
        or None (learned positions). With `kv`, x holds positions pos..pos+T-1 of a sequence
        whose earlier keys and values are cached (causal over all of them). doc_mask: [B, 1, T, T]
        bool (True = may attend; `document_causal_mask`), replacing the plain causal mask."""
        B, T, _ = x.shape
        h, g, dh = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.qkv(x).view(B, T, h + 2 * g, dh).split((h, g, g), dim=2)  # [B, T, ., dh]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, dh]
        p = self.dropout if self.training else 0.0
        mask = None
        if kv is not None:
            if pos == 0:
                kv.update(k, v, 0)
            else:
                k, v = kv.update(k, v, pos)  # [B, g, pos + T, dh]
                if T > 1:  # query i (position pos + i) sees keys 0..pos + i
                    mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        causal = kv is None or pos == 0
        if doc_mask is not None:
            if kv is not None:
                raise ValueError("a document mask does not go with a KV cache (decoding)")
            mask, causal = doc_mask, False
        y = sdpa(q, k, v, mask, causal, p)  # [B, h, T, dh]
        return self.proj(y.transpose(1, 2).reshape(B, T, h * dh))


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    dropout: float,
    expand_kv: bool | None = None,
) -> Tensor:
    """F.scaled_dot_product_attention with q [B, h, T, dh] and k, v [B, g, S, dh], g | h: query
    head j reads key/value head j // (h / g) (SDPA's enable_gqa, no copy of k and v). With a
    mask on CUDA (`expand_kv` None = that case) k and v are copied to h heads instead: SDPA's
    memory-efficient kernel, the one that takes a mask, has no grouped heads (unmeasured here)."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and (q.is_cuda and mask is not None if expand_kv is None else expand_kv):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, enable_gqa=gqa
    )


def document_causal_mask(positions: Tensor) -> Tensor:
    """positions [B, T] int (restarting at 0 at every document start) -> [B, 1, T, T] bool:
    query i may attend key j when j <= i and both are in one document (no zero position between
    them): a block-diagonal causal mask, built on positions' device without a host sync."""
    doc = (positions == 0).cumsum(-1)  # [B, T]: the document index of every token
    T = positions.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

"""Decoder-only Transformer LM with an MoE FFN every `moe_every` layers (dense otherwise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ACTIVATIONS, activate
from .init import init_parameters
from .layer import MoELayer
from .parallel import ExpertShard, is_expert_param
from .routing import RouterConfig
from .validation import above, at_least, check_finite, in_range, one_of


@dataclass
class ModelConfig:
    """Shape of the LM. num_experts is global (all ranks together)."""

    vocab_size: int = 256  # token ids are in [0, vocab_size)
    seq_len: int = 128  # tokens per training window (T); the longest context
    d_model: int = 128  # width of the residual stream (d)
    n_layers: int = 4  # Transformer blocks
    n_heads: int = 4  # attention heads (d_model must be divisible by it)
    d_ff: int = 512  # hidden width of the dense FFNs (and of the experts unless expert_d_ff)
    num_experts: int = 8  # experts per MoE layer, over all ranks (E)
    expert_d_ff: int | None = None  # None = d_ff
    moe_every: int = 2  # layer i is MoE when i % moe_every == moe_every - 1; 0 = dense model
    activation: str = "gelu"  # gelu | swiglu, in the dense FFNs and the experts
    dropout: float = 0.0  # dropout on attention and residual branches (0 = off)
    init_std: float = 0.02  # std of the normal init (output projections: / sqrt(2 n_layers))
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every > 0 and i % self.moe_every == self.moe_every - 1

    def validate(self) -> None:
        check_finite(self, "model")
        at_least(self, "model", 1, "vocab_size", "seq_len", "d_model", "n_layers", "n_heads")
        at_least(self, "model", 1, "d_ff", "num_experts")
        at_least(self, "model", 1, "expert_d_ff", optional=True)
        at_least(self, "model", 0, "moe_every")  # 0 = dense model
        one_of(self, "model", "activation", ACTIVATIONS)
        in_range(self, "model", 0, 1, "dropout")
        above(self, "model", 0, "init_std")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )


class LayerKV:
    """One layer's cached keys and values [B, h, seq_len, dh], allocated on first use (in the
    dtype the attention computes in)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v [B, h, T, dh] at positions pos..pos+T-1; all keys/values up to pos+T."""
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, kv: LayerKV | None = None, pos: int = 0) -> Tensor:
        """x: [B, T, d] -> [B, T, d]; with `kv`, x holds positions pos..pos+T-1 of a sequence whose
        earlier keys and values are cached (causal over all of them)."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if kv is None or pos == 0:
            if kv is not None:
                kv.update(k, v, 0)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            k, v = kv.update(k, v, pos)  # [B, h, pos + T, dh]
            mask = None  # one new token sees every cached one
            if T > 1:  # query i (position pos + i) sees keys 0..pos + i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))  # y: [B, h, T, dh]


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = nn.Linear(d_model, width, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        router: RouterConfig,
        layer_id: int,
        moe: bool,
        seed: int,
        shard: ExpertShard | None,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if moe:
            self.ffn: nn.Module = MoELayer(
                cfg.d_model,
                cfg.expert_d_ff or cfg.d_ff,
                router.num_experts_for(cfg.num_experts),
                router=router,
                activation=cfg.activation,
                shard=shard,
                layer_id=layer_id,
                seed=seed,
                init_std=cfg.init_std,
                out_std=out_std,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(
        self,
        x: Tensor,
        noise_seed: int | None,
        token_offset: int,
        kv: LayerKV | None = None,
        pos: int = 0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = x + self.drop(self.attn(self.ln1(x), kv, pos))
        h = self.ln2(x)
        if isinstance(self.ffn, MoELayer):
            out, losses = self.ffn(h, noise_seed=noise_seed, token_offset=token_offset)
        else:
            out, losses = self.ffn(h), {}
        return x + self.drop(out), losses


class MoETransformer(nn.Module):
    """`logits, aux_loss = model(idx)`; idx: [B, T] int64 -> logits [B, T, V], aux_loss scalar.

    Built from configs alone: `shard` (an ExpertShard, default all experts) says which experts
    this rank holds; no process group is touched, so any rank's model builds on any device,
    `torch.device("meta")` included (then nothing is initialised). Under torch.distributed,
    `moe_train.parallel.parallelize` connects the groups afterwards.
    `last_aux` holds the aux losses by name (summed over layers) of the last call.
    Every parameter is initialised from (seed, its name) and experts from their global ids
    (moe_train.init), so the model is the same whatever the parallel layout.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        router: RouterConfig,
        seed: int = 0,
        shard: ExpertShard | None = None,
    ):
        super().__init__()
        cfg.validate()
        router.validate(router.num_experts_for(cfg.num_experts))
        self.cfg, self.router_cfg = cfg, router
        # `_weight` skips nn.Embedding's own normal_ init, which would be wasted: init_parameters
        # (or, on meta, moe_train.init.materialize) sets every value. A first normal_ on meta
        # imports torch's reference kernels (~1.5 s); the trainer's optimizer imports them anyway,
        # so this saves start-up only where no optimizer is built (planner, generate, eval).
        self.tok_emb = nn.Embedding(
            cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model)
        )
        self.pos_emb = nn.Embedding(
            cfg.seq_len, cfg.d_model, _weight=torch.empty(cfg.seq_len, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, router, i, cfg.is_moe_layer(i), seed, shard) for i in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.last_aux: dict[str, Tensor] = {}
        if not self.head.weight.is_meta:  # on meta: moe_train.init.materialize after parallelize
            init_parameters(self, seed)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self,
        idx: Tensor,
        noise_seed: int | None = None,
        token_offset: int = 0,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        """idx: [B, T]; token_offset: global index of idx[0, 0] (keys layout-invariant noise).
        With `cache` (inference), idx continues the cached sequence: positions cache.length.."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(
                f"sequence length {start + T} exceeds model.seq_len={self.cfg.seq_len}"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, T, d]
        aux: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            x, losses = block(x, noise_seed, token_offset, kv, start)
            for k, v in losses.items():
                aux[k] = aux[k] + v if k in aux else v
        if cache is not None:
            cache.length += T
        logits = self.head(self.ln_f(x))  # [B, T, V]
        self.last_aux = aux
        total = sum(aux.values()) if aux else logits.new_zeros(())
        return logits, total  # type: ignore[return-value]

    def num_params(self) -> dict[str, int]:
        """Parameters held by this rank, split dense / expert (tied weights counted once)."""
        seen, dense, expert = set(), 0, 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if is_expert_param(p):
                expert += p.numel()
            else:
                dense += p.numel()
        return {"dense": dense, "expert": expert, "total": dense + expert}

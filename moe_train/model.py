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
from .validation import at_least, check_finite, in_range, one_of


@dataclass
class ModelConfig:
    """Shape of the LM. num_experts is global (all ranks together)."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    num_experts: int = 8
    expert_d_ff: int | None = None  # None = d_ff
    moe_every: int = 2  # layer i is MoE when i % moe_every == moe_every - 1; 0 = dense model
    activation: str = "gelu"
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True

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
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B, h, T, dh]
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


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
        self, x: Tensor, noise_seed: int | None, token_offset: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = x + self.drop(self.attn(self.ln1(x)))
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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
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
        self, idx: Tensor, noise_seed: int | None = None, token_offset: int = 0
    ) -> tuple[Tensor, Tensor]:
        """idx: [B, T]; token_offset: global index of idx[0, 0] (keys layout-invariant noise)."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, T, d]
        aux: dict[str, Tensor] = {}
        for block in self.blocks:
            x, losses = block(x, noise_seed, token_offset)
            for k, v in losses.items():
                aux[k] = aux[k] + v if k in aux else v
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

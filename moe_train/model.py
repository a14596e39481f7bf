"""Decoder-only Transformer LM with an MoE FFN every `moe_every` layers (dense otherwise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import ACTIVATIONS, activate
from .init import deferred_init
from .layer import MoELayer
from .parallel import ExpertShard, is_expert_param
from .routing import RouteKey, RouterConfig
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

    @property
    def output_init_std(self) -> float:
        """std of the output projections (attention, FFN and experts' w_out): GPT-2's
        init_std / sqrt(2 n_layers), one per residual branch."""
        return self.init_std / math.sqrt(2 * self.n_layers)

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


# ---- the body's parameter holders: each owns its init rule (moe_train.init) -----------------
@torch.no_grad()
def _reset_by_rule(module: Linear | Embedding | LayerNorm) -> None:
    """A module's own parameters by its `init_value`, from the global RNG; nothing on meta (inside
    a model: moe_train.init draws every value once, from its layout-invariant key)."""
    for name, p in module.named_parameters(recurse=False):
        if not p.is_meta:
            p.copy_(module.init_value(name, p.shape))


class Linear(nn.Linear):
    """A bias-free nn.Linear whose weight starts normal(0, init_std); the module that holds it
    chooses init_std (output projections: ModelConfig.output_init_std)."""

    def __init__(self, d_in: int, d_out: int, init_std: float):
        self.init_std = init_std  # set first: nn.Linear.__init__ calls reset_parameters
        super().__init__(d_in, d_out, bias=False)

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.randn(shape, generator=generator) * self.init_std

    def reset_parameters(self) -> None:
        _reset_by_rule(self)


class Embedding(nn.Embedding):
    """nn.Embedding whose table starts normal(0, init_std) (not torch's normal(0, 1))."""

    def __init__(self, num: int, dim: int, init_std: float):
        self.init_std = init_std  # set first: nn.Embedding.__init__ calls reset_parameters
        super().__init__(num, dim)

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.randn(shape, generator=generator) * self.init_std

    def reset_parameters(self) -> None:
        _reset_by_rule(self)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm: weight 1, bias 0 (its rule, as an init_value)."""

    def init_value(
        self, name: str, shape: torch.Size, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)

    def reset_parameters(self) -> None:
        _reset_by_rule(self)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, cfg.init_std)
        self.proj = Linear(cfg.d_model, cfg.d_model, cfg.output_init_std)  # output projection

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
    def __init__(self, d_model: int, d_ff: int, activation: str, init_std: float, out_std: float):
        super().__init__()
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = Linear(d_model, width, init_std)
        self.w_out = Linear(d_ff, d_model, out_std)  # output projection

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
        self.ln1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
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
                out_std=cfg.output_init_std,
            )
        else:
            self.ffn = DenseFFN(
                cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_std, cfg.output_init_std
            )

    def forward(
        self, x: Tensor, route_key: RouteKey | None, kv: LayerKV | None = None, pos: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = x + self.drop(self.attn(self.ln1(x), kv, pos))
        h = self.ln2(x)
        if isinstance(self.ffn, MoELayer):
            out, losses = self.ffn(h, route_key)
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
    Every parameter is initialised once, by its module's rule, from a generator keyed by (seed,
    its name; in an MoE layer, the layer id and its name there) and experts by their global ids
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
        with deferred_init(self, seed):  # on meta; then, on a real device, each value drawn once
            self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std)
            self.pos_emb = Embedding(cfg.seq_len, cfg.d_model, cfg.init_std)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(
                Block(cfg, router, i, cfg.is_moe_layer(i), seed, shard) for i in range(cfg.n_layers)
            )
            self.ln_f = LayerNorm(cfg.d_model)
            self.head = Linear(cfg.d_model, cfg.vocab_size, cfg.init_std)
            if cfg.tie_embeddings:
                self.head.weight = self.tok_emb.weight
        self.last_aux: dict[str, Tensor] = {}

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self, idx: Tensor, route_key: RouteKey | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor]:
        """idx: [B, T]; route_key: the router noise's key (the train step's seed, and the global
        index of idx[0, 0]), passed to every MoE layer unchanged; None: fresh training noise, none
        in eval. With `cache` (inference), idx continues the cached sequence: positions
        cache.length.."""
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
            x, losses = block(x, route_key, kv, start)
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

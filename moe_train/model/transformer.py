"""Decoder-only Transformer LM: pre-norm blocks of attention and an FFN, MoE where
ModelConfig.is_moe_layer says (dense otherwise)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..experts import activate
from ..init import deferred_init
from ..layer import MoELayer
from ..parallel import ExpertShard, is_expert_param
from ..routing import RouteKey, RouterConfig
from .attention import Attention, KVCache, LayerKV, document_causal_mask
from .config import ModelConfig
from .params import Embedding, Linear, build_norm
from .rope import RotaryEmbedding


class DenseFFN(nn.Module):
    """x [.., d] -> w_out(act(w_in x)): GELU over w_in [f, d], or SwiGLU silu(gate) * up over
    w_in [2f, d] (gate rows first, then up), w_out [d, f]; bias-free."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        out_std = init_std if out_std is None else out_std
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in = Linear(d_model, width, init_std)
        self.w_out = Linear(d_ff, d_model, out_std)  # output projection

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class Block(nn.Module):
    """Pre-norm block: x += attn(ln1(x)); x += ffn(ln2(x)); the FFN is an MoELayer or DenseFFN.
    ln1/ln2 are model.norm's kind (RMSNorm or LayerNorm)."""

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
        self.ln1 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
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
                shared_experts=cfg.shared_experts,
                shared_d_ff=cfg.shared_width,
                shared_gate=cfg.shared_gate,
            )
        else:
            self.ffn = DenseFFN(
                cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_std, cfg.output_init_std
            )

    def forward(
        self,
        x: Tensor,
        route_key: RouteKey | None,
        kv: LayerKV | None = None,
        pos: int = 0,
        rope: tuple[Tensor, Tensor] | None = None,
        doc_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x: [B, T, d] at positions pos.. -> (x after the block, the MoE layer's aux losses);
        doc_mask [B, 1, T, T] bool: attention inside documents only (see Attention)."""
        x = x + self.drop(self.attn(self.ln1(x), kv, pos, rope, doc_mask))
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
            self.pos_emb: Embedding | None = None  # learned positions
            self.rope: RotaryEmbedding | None = None  # rotary positions (buffers only)
            if cfg.position == "learned":
                self.pos_emb = Embedding(cfg.seq_len, cfg.d_model, cfg.init_std)
            else:
                self.rope = RotaryEmbedding(cfg.head_width, cfg.seq_len, cfg.rope_theta)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(
                Block(cfg, router, i, cfg.is_moe_layer(i), seed, shard) for i in range(cfg.n_layers)
            )
            self.ln_f = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            self.head = Linear(cfg.d_model, cfg.vocab_size, cfg.init_std)
            if cfg.tie_embeddings:
                self.head.weight = self.tok_emb.weight
        self.last_aux: dict[str, Tensor] = {}
        # compiled blocks (parallel/compile.py) take each layer's noise seed as a tensor
        self.seeds_as_tensors = False

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self,
        idx: Tensor,
        route_key: RouteKey | None = None,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """idx: [B, T]; route_key: the router noise's key (the train step's seed, and the global
        index of idx[0, 0]), passed to every MoE layer unchanged; None: fresh training noise, none
        in eval. With `cache` (inference), idx continues the cached sequence: positions
        cache.length... `positions` [B, T] int64 (data.document_mask; not with a cache): each
        token's position inside its document, restarting at 0 at every document start; the
        tokens take these positions (RoPE or learned) and attend inside their document only."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(
                f"sequence length {start + T} exceeds model.seq_len={self.cfg.seq_len}"
            )
        doc_mask = None
        if positions is not None:
            if cache is not None or positions.shape != idx.shape:
                raise ValueError(
                    f"positions {tuple(positions.shape)} must match idx {tuple(idx.shape)}, "
                    "without a KV cache (document masks are for training and evaluation)"
                )
            doc_mask = document_causal_mask(positions)  # [B, 1, T, T], shared by every layer
        x = self.tok_emb(idx)  # [B, T, d]
        if self.pos_emb is not None:
            where = torch.arange(start, start + T, device=idx.device)
            x = x + self.pos_emb(where if positions is None else positions)
        x = self.drop(x)
        rope = None
        if self.rope is not None:  # cos, sin [T, dh], or [B, T, dh] at per-row positions
            rope = self.rope(start, T) if positions is None else self.rope.at(positions)
        aux: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks):
            kv = cache.layers[i] if cache is not None else None
            key = route_key
            if key is not None and self.seeds_as_tensors and isinstance(block.ffn, MoELayer):
                key = key.for_compiled_layer(block.ffn.layer_id, idx.device)  # tensor seed
            x, losses = block(x, key, kv, start, rope, doc_mask)
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

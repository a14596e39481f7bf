"""A tiny MoE model and its optimizer for the checkpoint tests (also run in subprocesses)."""

from __future__ import annotations

import torch

from moe_train.model import ModelConfig, MoETransformer
from moe_train.routing import RouteKey, RouterConfig

CFG = ModelConfig(
    vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=24, num_experts=4, moe_every=1
)
ROUTER = RouterConfig(kind="topk", top_k=2)


def make(seed: int = 0, cfg: ModelConfig = CFG):
    torch.manual_seed(seed)
    model = MoETransformer(cfg, ROUTER, seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model, opt, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1), generator=g)
    logits, aux = model(x[:, :-1], RouteKey(i))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) + aux
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())

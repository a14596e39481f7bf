"""trainer.compile=blocks: torch.compile per Transformer block (moe_train.parallel.compile).

At ep = 1 the MoE block traces in one graph (dynamo's counters: no graph break) for a dropless and
a capacity router; the compiled model's loss curve matches eager within 1e-4 per step; and its
state-dict keys are the eager model's (checkpoints interchangeable). CPU inductor: a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_train.model import ModelConfig, MoETransformer
from moe_train.ops.hashing import mix_seed
from moe_train.parallel import ParallelConfig, ParallelDims, ProcessGroups, parallelize
from moe_train.parallel.compile import COMPILE_MODES, DYNAMO_CONFIG, compile_blocks
from moe_train.routing import RouteKey, RouterConfig

pytestmark = pytest.mark.slow  # inductor compiles C++ on the CPU: seconds per graph


def tiny(n_layers: int = 1) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, seq_len=16, d_model=32, n_layers=n_layers, n_heads=2, d_ff=48,
        num_experts=4, moe_every=1,
    )  # fmt: skip


@pytest.mark.parametrize(
    "router",
    [
        RouterConfig(kind="topk", top_k=2, capacity_factor=None, random_routing=False),
        RouterConfig(kind="switch", capacity_factor=1.25),
    ],
    ids=["topk-dropless", "switch-capacity"],
)
def test_the_moe_block_compiles_without_a_graph_break(router):
    import torch._dynamo as dynamo

    model = MoETransformer(tiny(), router, seed=0)
    x = torch.randn(2, 16, 32, requires_grad=True)
    dynamo.reset()
    with dynamo.config.patch(**DYNAMO_CONFIG):  # what compile_blocks sets
        explained = dynamo.explain(model.blocks[0])(x, RouteKey(1))
    reasons = [b.reason for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def _curve(compiled: bool, router: RouterConfig, steps: int = 4) -> tuple[list[float], nn.Module]:
    torch.manual_seed(0)
    model = MoETransformer(tiny(3), router, seed=0)
    parallelize(
        model, ParallelDims(), ProcessGroups(), ParallelConfig(),
        compile="blocks" if compiled else "none",
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        tok = torch.randint(0, 64, (4, 17), generator=g)
        # a new noise seed and token offset every step, as the train step makes them
        logits, aux = model(tok[:, :-1], RouteKey(mix_seed(7, step), step * 64))
        loss = F.cross_entropy(logits.reshape(-1, 64), tok[:, 1:].reshape(-1)) + aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model


@pytest.mark.parametrize(
    "router",
    [
        RouterConfig(kind="switch", capacity_factor=1.25),  # jitter (the switch default)
        RouterConfig(kind="topk", top_k=2, capacity_factor=1.5, random_routing=True),
    ],
    ids=["switch-jitter", "topk-random-routing"],
)
def test_compiled_blocks_train_the_eager_loss_curve_and_keep_the_checkpoint_keys(router):
    """Three MoE layers, four steps, each step its own seed and offset: the noise (jitter, GShard's
    random second expert) is the eager model's, and dynamo compiles the block once in all (seed
    and token offset reach it as tensors), not once per layer, step or offset."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    eager, eager_model = _curve(False, router)
    dynamo.reset()
    counters.clear()
    compiled, compiled_model = _curve(True, router)
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: eager {a}, compiled {b}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert list(compiled_model.state_dict()) == list(eager_model.state_dict())
    assert not any("_orig_mod" in k for k in compiled_model.state_dict())
    # and the weights load across: compiled -> eager gives the same function
    eager_model.load_state_dict(compiled_model.state_dict())


def test_compile_modes_are_checked():
    assert COMPILE_MODES == ("none", "blocks")
    with pytest.raises(ValueError, match="trainer.compile"):
        compile_blocks(MoETransformer(tiny(), RouterConfig()), "all")

"""Document masking (data.document_mask): per-row positions that restart at each document give a
block-diagonal causal mask and restarted positions; one document per row is the unmasked model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_train import ModelConfig, MoETransformer, RouterConfig
from moe_train.model import LEGACY_BODY, KVCache, rope
from moe_train.model.attention import document_causal_mask, sdpa

# the modern body (RoPE, GQA, qk-norm) and the GPT-2 body (learned positions: they restart too)
CFG = ModelConfig(
    vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm="head",
    d_ff=48, num_experts=4, moe_every=1,
)  # fmt: skip
BODIES = {"modern": CFG, "gpt2": replace(CFG, **LEGACY_BODY)}
# dropless token choice: a token's route does not depend on the other tokens of the batch
ROUTER = RouterConfig(kind="topk", top_k=2, capacity_factor=None)


def model_of(body: str) -> MoETransformer:
    return MoETransformer(BODIES[body], ROUTER, seed=5).eval()


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def restart_at(T: int, *starts: int) -> torch.Tensor:
    """[T] positions restarting at 0 at 0 and at each of `starts`."""
    pos = torch.arange(T)
    for s in starts:
        pos[s:] = torch.arange(T - s)
    return pos


def test_the_mask_is_block_diagonal_and_causal():
    mask = document_causal_mask(restart_at(5, 2)[None])  # documents [0, 1] and [2, 3, 4]
    want = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0], want)


@pytest.mark.parametrize("body", sorted(BODIES))
def test_one_document_per_row_is_the_unmasked_model(body):
    model, idx = model_of(body), tokens(3, 16)
    plain, _ = model(idx)  # is_causal=True, no mask tensor
    masked, _ = model(idx, positions=torch.arange(16).expand(3, 16))
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("body", sorted(BODIES))
def test_each_document_of_a_window_is_scored_as_if_alone(body):
    """Row 0 holds documents [0, 5) and [5, 16), row 1 [0, 9) and [9, 16): every document's
    logits equal that document run alone from position 0."""
    model, idx = model_of(body), tokens(2, 16, seed=1)
    pos = torch.stack([restart_at(16, 5), restart_at(16, 9)])
    logits, _ = model(idx, positions=pos)
    for row, cut in ((0, 5), (1, 9)):
        first, _ = model(idx[row : row + 1, :cut])
        second, _ = model(idx[row : row + 1, cut:])
        torch.testing.assert_close(logits[row, :cut], first[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[row, cut:], second[0], rtol=1e-5, atol=1e-5)
    unmasked, _ = model(idx)  # attention across the boundary changes the second document
    assert not torch.allclose(unmasked[0, 5:], logits[0, 5:], atol=1e-3)


def test_rope_rotates_each_document_from_position_zero(monkeypatch):
    """RoPE scores depend on position differences only, so the logits above hardly see a missing
    restart: the angles the attention receives are checked instead."""
    seen = []
    real = rope.apply_rope
    monkeypatch.setattr(
        "moe_train.model.attention.apply_rope",
        lambda x, cos, sin: seen.append(cos) or real(x, cos, sin),
    )
    model = model_of("modern")
    pos = torch.stack([restart_at(16, 5), torch.arange(16)])
    model(tokens(2, 16), positions=pos)
    tables = model.rope.cos  # [seq_len, head_dim], row p = position p
    assert seen and all(c.shape == (2, 16, tables.shape[1]) for c in seen)
    torch.testing.assert_close(seen[0][0, 5:], tables[:11])  # document 2 from position 0
    torch.testing.assert_close(seen[0][1], tables[:16])


def test_masked_training_step_gives_finite_gradients_everywhere():
    model = MoETransformer(CFG, ROUTER, seed=5).train()
    logits, aux = model(tokens(2, 16), positions=torch.stack([restart_at(16, 3, 11)] * 2))
    (logits.square().mean() + aux).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_positions_with_a_cache_or_of_another_shape_are_refused():
    model = model_of("modern")
    with pytest.raises(ValueError, match="positions"):
        model(tokens(1, 4), cache=KVCache(CFG), positions=torch.arange(4)[None])
    with pytest.raises(ValueError, match="positions"):
        model(tokens(2, 8), positions=torch.arange(8)[None])


def test_grouped_heads_copied_for_a_masked_kernel_give_the_same_attention():
    """The CUDA masked path copies k, v to every query head; the same numbers as enable_gqa."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, n, 8, 4, generator=g) for n in (4, 2, 2))
    mask = document_causal_mask(torch.stack([restart_at(8, 3), restart_at(8, 6)]))
    grouped = sdpa(q, k, v, mask, False, 0.0, expand_kv=False)
    torch.testing.assert_close(sdpa(q, k, v, mask, False, 0.0, expand_kv=True), grouped)
    alone = sdpa(q[:1, :, 3:], k[:1, :, 3:], v[:1, :, 3:], None, True, 0.0)
    torch.testing.assert_close(grouped[:1, :, 3:6], alone[:, :, :3])  # row 0's second document

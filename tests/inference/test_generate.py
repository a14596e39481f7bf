"""Generation: the KV cache gives the full forward's logits, sampling options, the sliding window,
and `moe-train-generate` on a trained run."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from moe_train import ModelConfig, MoETransformer, RouterConfig, generate
from moe_train.inference.generate import sample_next, uses_cache
from moe_train.model import LEGACY_BODY, KVCache
from tests.helpers.runs import cli

# the modern body with GQA and qk-norm (RoPE offsets in the cache); GPT2: learned positions
CFG = ModelConfig(
    vocab_size=64, seq_len=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm="head",
    d_ff=48, num_experts=4, moe_every=1,
)  # fmt: skip
GPT2 = replace(CFG, **LEGACY_BODY)
generate_mod = importlib.import_module(
    "moe_train.inference.generate"
)  # the module, not the function
# dropless, so the full forward drops no token that the one-token decode steps would keep
ROUTERS = {
    "switch": RouterConfig(kind="switch", capacity_factor=None),
    "topk": RouterConfig(kind="topk", top_k=2, capacity_factor=None),
    "prototype": RouterConfig(kind="prototype", top_k=2, capacity_factor=None),
    "sam": RouterConfig(kind="sam", top_k=2, num_groups=2, capacity_factor=None),
    "tree": RouterConfig(kind="tree", capacity_factor=None),
}


def model_for(router: RouterConfig, cfg: ModelConfig = CFG) -> MoETransformer:
    torch.manual_seed(3)
    return MoETransformer(cfg, router, seed=3).eval()


@pytest.mark.parametrize(
    ("kind", "body"), [(kind, "modern") for kind in sorted(ROUTERS)] + [("topk", "gpt2")]
)
def test_cached_decoding_gives_the_full_forward_logits(kind, body):
    model = model_for(ROUTERS[kind], CFG if body == "modern" else GPT2)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    with torch.no_grad():
        full, _ = model(idx)  # [2, T, V]
        cache = KVCache(CFG)
        steps = [model(idx[:, :5], cache=cache)[0]]  # a 5-token prompt, then one at a time
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, CFG.seq_len)]
    assert cache.length == CFG.seq_len
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_multi_token_chunk_after_the_cache_is_causal():
    model = model_for(ROUTERS["switch"])
    idx = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(CFG)
        first, _ = model(idx[:, :4], cache=cache)
        rest, _ = model(idx[:, 4:], cache=cache)  # 8 tokens at positions 4..11
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_the_cache_cannot_grow_past_seq_len():
    model = model_for(ROUTERS["switch"])
    cache = KVCache(CFG)
    with torch.no_grad():
        model(torch.zeros(1, CFG.seq_len, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="seq_len"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_greedy_generation_with_and_without_the_cache_agree():
    model = model_for(ROUTERS["topk"])
    prompt = torch.randint(0, CFG.vocab_size, (2, 3))
    cached = generate(model, prompt, 15, temperature=0, use_cache=True)
    recomputed = generate(model, prompt, 15, temperature=0, use_cache=False)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :3], prompt)


@pytest.mark.parametrize("body", ["modern", "gpt2"])
def test_generation_slides_past_seq_len_and_every_cached_step_is_the_full_forward(
    body, monkeypatch
):
    """Past seq_len generate re-encodes the window's last 3/4 from position 0 (RoPE offsets
    restart): each step's logits equal a full forward of the tokens its cache holds."""
    model = model_for(ROUTERS["switch"], CFG if body == "modern" else GPT2)
    caches: list[KVCache] = []  # kept alive: each cache's id stays its own
    held: dict[int, Tensor] = {}  # id(cache) -> the tokens it holds
    checked = []
    real = generate_mod._forward_last

    def forward_last(model, idx, cache):
        logits = real(model, idx, cache)
        if cache is not None:
            if id(cache) not in held:
                caches.append(cache)
            held[id(cache)] = torch.cat([held.get(id(cache), idx[:, :0]), idx], dim=1)
            full = model(held[id(cache)])[0][:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            checked.append(held[id(cache)].shape[1])
        return logits

    monkeypatch.setattr(generate_mod, "_forward_last", forward_last)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CFG.vocab_size, (2, 5), generator=gen)
    out = generate(model, prompt, 3 * CFG.seq_len, generator=gen)
    assert out.shape == (2, 5 + 3 * CFG.seq_len)
    assert len(held) > 2 and checked[0] == 5  # slid at least twice; the prompt in one pass
    assert max(checked) == CFG.seq_len and min(checked[1:]) < CFG.seq_len
    assert int(out.max()) < CFG.vocab_size


def test_expert_choice_decodes_without_the_cache():
    model = model_for(RouterConfig(kind="expert_choice", capacity_factor=2.0))
    assert not uses_cache(model) and uses_cache(model_for(ROUTERS["switch"]))
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    out = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():  # the recomputed window routes like a full forward of it
        expected = model(out[:, :-1])[0][:, -1].argmax(-1)
    assert out.shape == (1, 10) and int(out[0, -1]) == int(expected)


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 9.0], [5.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, None, gen).tolist() == [3, 0]  # greedy
    assert sample_next(logits, 1.0, 1, gen).tolist() == [3, 0]  # top-1 is greedy too
    # the padded vocabulary (ids >= 3) is never drawn, even where it is the most likely
    draws = torch.stack([sample_next(logits, 2.0, None, gen, vocab_limit=3) for _ in range(200)])
    assert int(draws.max()) <= 2 and set(draws[:, 0].tolist()) == {0, 1, 2}
    first = sample_next(logits, 1.0, None, torch.Generator().manual_seed(7))
    again = sample_next(logits, 1.0, None, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)  # --seed makes it reproducible


@pytest.mark.slow
def test_generate_cli_prints_a_continuation(tiny_run):
    args = [str(tiny_run), "--prompt", "def ", "--max-new-tokens", "40", "--no-stop"]
    p = cli("inference.generate", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.strip()) > 0
    assert "step 30" in p.stderr and "40 tokens" in p.stderr and "KV cache" in p.stderr
    assert cli("inference.generate", *args).stdout == p.stdout  # same seed, same text
    other = cli("inference.generate", *args, "--seed", "1").stdout
    assert other != p.stdout


@pytest.mark.slow
def test_generate_cli_names_a_folder_without_a_run(tmp_path):
    p = cli("inference.generate", str(tmp_path), "--prompt", "x")
    assert p.returncode == 2 and "config.yaml" in p.stderr

"""Mixtures: every step's batch takes each source's largest-remainder share, the same whatever
the ranks; tied remainders take turns; bad weights, mismatched tokenizers, short sources and
duplicate names are refused by name."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_train.data import (
    BatchSampler,
    DataConfig,
    DataError,
    MixSource,
    TokenStream,
    open_data,
    prepare_corpus,
    write_tokens,
)
from moe_train.data.mixture import Mixture, check_weights
from moe_train.training.batches import BatchPlan


def hamilton(weights, B):
    """Largest remainder by the book (ties: first source first)."""
    q = [Fraction(B) * Fraction(w) / sum(Fraction(x) for x in weights) for w in weights]
    n = [int(x) for x in q]
    for i in sorted(range(len(q)), key=lambda i: (-(q[i] - n[i]), i))[: B - sum(n)]:
        n[i] += 1
    return n


@pytest.mark.parametrize(
    "weights, B",
    [([0.7, 0.3], 4), ([3, 1], 16), ([0.5, 0.3, 0.2], 9), ([1e-3, 1.0, 2.5], 7), ([5], 3)],
)
def test_counts_are_the_largest_remainder_every_step(weights, B):
    m = Mixture(weights, B, seed=0)
    want = hamilton(weights, B)
    for step in range(12):
        assert m.counts(step).tolist() == want
    assert m.cumulative(12).tolist() == [12 * n for n in want]


@pytest.mark.parametrize("k, B, seed", [(3, 4, 0), (3, 4, 7), (5, 7, 3), (4, 2, 1)])
def test_tied_remainders_take_turns_and_even_out(k, B, seed):
    m = Mixture([1.0] * k, B, seed)
    counts = np.array([m.counts(s) for s in range(k * 5)])
    assert (counts.sum(1) == B).all()
    assert set(counts.ravel().tolist()) <= {B // k, B // k + 1}  # floor or ceil of the quota
    assert (counts.sum(0) == counts.sum(0)[0]).all()  # over k steps: exactly equal shares
    for s in range(len(counts) + 1):  # the closed form the epoch sampler uses
        assert m.cumulative(s).tolist() == counts[:s].sum(0).tolist()
    assert not np.array_equal(Mixture([1.0] * k, B, seed + 1).counts(0), m.counts(0)) or k == B


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_weights_must_be_positive_and_finite(weight, tmp_path):
    with pytest.raises(DataError, match="'web' has weight .*positive, finite"):
        check_weights([1.0, weight], ["code", "web"])
    cfg = DataConfig(mix=[MixSource(str(tmp_path), 1.0), MixSource(str(tmp_path), weight)])
    with pytest.raises(ValueError, match=r"data.mix\[1\].weight: must be a positive, finite"):
        cfg.validate()


def flat_source(root: Path, n: int, vocab: int = 256, tokenizer: str = "bytes", base: int = 0):
    ids = (np.arange(n) + base) % vocab
    write_tokens(root / "train.bin", ids, vocab, tokenizer)
    write_tokens(root / "val.bin", ids[:400], vocab, tokenizer)
    return root


def mix_cfg(*sources, **kw) -> DataConfig:
    return DataConfig(mix=[MixSource(str(p), w, name) for p, w, name in sources], **kw)


def test_sources_of_different_tokenizers_or_vocabularies_are_refused(tmp_path):
    a = flat_source(tmp_path / "a", 3000)
    corpus = tmp_path / "text"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"some text {i} " * 50)
    prepare_corpus([str(corpus)], tmp_path / "bpe", progress=False, tokenizer="bpe", vocab_size=300)
    with pytest.raises(
        DataError, match=r"sources 'a' \(.*bytes, vocabulary 256\) and 'bpe' \(.*tokenizer.json"
    ):
        open_data(mix_cfg((a, 1, None), (tmp_path / "bpe", 1, None)))
    b = flat_source(tmp_path / "b", 3000, vocab=300, tokenizer="unknown")
    (tmp_path / "b" / "train.json").unlink()  # raw files: tokenizer unknown
    (tmp_path / "b" / "val.json").unlink()
    with pytest.raises(DataError, match="cannot be checked: put its tokenizer.json next to it"):
        open_data(mix_cfg((a, 1, None), (b, 1, None)), vocab_size=300)


def test_duplicate_names_and_short_sources_are_named(tmp_path):
    a = flat_source(tmp_path / "x" / "data", 3000)
    b = flat_source(tmp_path / "y" / "data", 3000)
    with pytest.raises(DataError, match="two sources are named 'data'"):
        open_data(mix_cfg((a, 1, None), (b, 1, None)))
    data = open_data(mix_cfg((a, 1, "web"), (b, 1, "code")))
    assert [s.name for s in data.sources] == ["web", "code"]
    short = flat_source(tmp_path / "short", 40)
    from moe_train.config import TrainConfig
    from moe_train.training.build import open_training_data

    cfg = TrainConfig()
    cfg.data = mix_cfg((a, 1, "web"), (short, 1, "tiny"))
    cfg.model.seq_len, cfg.trainer.eval_batches = 64, 0
    with pytest.raises(
        DataError, match=r"short/train.bin \(data.mix source 'tiny'\) has 40 tokens"
    ):
        open_training_data(cfg)
    with pytest.raises(ValueError, match="data.mix and data.dir are both set"):
        DataConfig(dir=str(a), mix=[MixSource(str(b))]).validate()


def streams(k: int, n: int = 5000) -> list[TokenStream]:
    """Source i holds tokens i*1000 + position: a row tells which source and where it is from."""
    return [TokenStream.of(np.arange(n) + 10_000 * i) for i in range(k)]


@pytest.mark.parametrize("sampling", ["windows", "epoch"])
def test_each_step_draws_each_sources_share(sampling):
    s = BatchSampler(
        streams(3), [0.5, 0.3, 0.2], seed=4, global_batch=10, seq_len=8, sampling=sampling
    )
    for step in range(6):
        x, y = s.batch(step)
        source = (x[:, 0] // 10_000).tolist()
        assert [source.count(i) for i in range(3)] == [5, 3, 2]
        assert torch.equal(x[:, 1:], y[:, :-1]) and (y[:, -1] == x[:, -1] + 1).all()
        assert ((x % 10_000) < 5000).all()
    a, _ = s.batch(2)
    b, _ = BatchSampler(streams(3), [0.5, 0.3, 0.2], 4, 10, 8, sampling).batch(2)
    assert torch.equal(a, b)  # a pure function of (seed, step)


def test_one_source_keeps_the_batches_it_had_before_mixtures():
    from moe_train.data import get_batch, sample_offsets

    data = np.arange(3000) % 256
    x, _ = BatchSampler([TokenStream.of(data)], [1.0], 9, 6, 16).batch(3)
    starts = sample_offsets(9, 3, 6, 3000, 16)
    assert torch.equal(x, torch.stack([torch.from_numpy(data[o : o + 16]) for o in starts]).long())
    assert torch.equal(get_batch(data, 9, 3, 6, 16)[0], x)


@pytest.mark.parametrize("sampling", ["windows", "epoch"])
@pytest.mark.parametrize("world, micro", [(1, 12), (2, 3), (3, 2), (4, 3)])
def test_the_global_batch_does_not_depend_on_the_layout(tmp_path, sampling, world, micro):
    a, b = flat_source(tmp_path / "a", 4000), flat_source(tmp_path / "b", 4000, base=7)
    data = open_data(mix_cfg((a, 2, "a"), (b, 1, "b"), sampling=sampling))
    ref = [
        BatchPlan(1, 12, 16, 12, 1, 0, 1, torch.device("cpu")).micro_batches(data, s)
        for s in range(3)
    ]
    ref = [torch.cat([x for x, *_ in m]) for m in ref]
    for step in range(3):
        parts = []
        for rank in range(world):
            plan = BatchPlan(
                1, 12, 16, micro, 12 // world // micro, rank, world, torch.device("cpu")
            )
            parts += [x for x, *_ in plan.micro_batches(data, step)]
        assert torch.equal(torch.cat(parts), ref[step]), (step, world)

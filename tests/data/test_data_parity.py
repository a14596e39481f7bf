"""A mixture of two sources with epoch sampling on 2 gloo ranks: every rank's share of every
global batch (run_ranks, each rank opening the data itself) tiles the 1-process batch, and
`moe-train` on 2 ranks (ep=2) trains the 1-process loss curve through several epochs of the
small source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.cli_runs import STEPS, run
from tests.helpers.distributed import run_ranks, teardown

pytestmark = pytest.mark.distributed

SEQ, BATCH, SEED = 64, 8, 1337


def write_corpus(root: Path, n_docs: int, tag: str) -> None:
    root.mkdir(parents=True)
    for i in range(n_docs):
        words = " ".join(f"{tag}{(i * 7 + j) % 23}" for j in range(40 + i % 30))
        (root / f"{tag}{i:03d}.txt").write_text(f"# {tag} document {i}\n{words}\n")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    from moe_train.data import prepare_corpus

    root = tmp_path_factory.mktemp("mix")
    write_corpus(root / "big_text", 120, "w")
    write_corpus(root / "small_text", 8, "c")  # about 20 windows: an epoch every few steps
    for name in ("big", "small"):
        prepare_corpus([str(root / f"{name}_text")], root / name, val_fraction=0.2, progress=False)
    return str(root / "big"), str(root / "small")


def mix_overrides(big: str, small: str) -> list[str]:
    return [f"data.mix=[{{path:{big},weight:2}},{{path:{small},weight:1}}]", "data.sampling=epoch"]


def rank_batches(rank: int, world: int, big: str, small: str, steps: int) -> list[np.ndarray]:
    """This rank's rows of steps [0, steps), from its own process group and its own data."""
    from moe_train.data import DataConfig, MixSource, open_data
    from moe_train.parallel import ParallelConfig, init_parallel
    from moe_train.routing import RouterConfig
    from moe_train.training.batches import BatchPlan

    state = init_parallel(ParallelConfig(backend="gloo"), 4, RouterConfig())
    data = open_data(DataConfig(mix=[MixSource(big, 2.0), MixSource(small, 1.0)], sampling="epoch"))
    dims = state.dims
    share = BATCH // dims.world_size
    plan = BatchPlan(SEED, BATCH, SEQ, share // 2, 2, dims.rank, dims.world_size,
                     torch.device("cpu"))  # fmt: skip
    out = [torch.cat([x for x, *_ in plan.micro_batches(data, s)]).numpy() for s in range(steps)]
    teardown(state)
    return out


def test_each_rank_reads_its_share_of_the_one_process_batches(sources):
    steps = 12
    single = run_ranks(rank_batches, 1, *sources, steps, timeout=120)[0]
    two = run_ranks(rank_batches, 2, *sources, steps, timeout=120)
    for s in range(steps):
        assert np.array_equal(np.concatenate([two[0][s], two[1][s]]), single[s]), s


@pytest.mark.slow
def test_two_ranks_train_the_one_process_curve_on_a_mixture_with_epochs(tmp_path, sources):
    from moe_train.data import DataConfig, MixSource, open_data

    data = open_data(DataConfig(mix=[MixSource(sources[0], 2), MixSource(sources[1], 1)],
                                sampling="epoch"))  # fmt: skip
    assert data.sampler(SEED, BATCH, SEQ).epoch_steps(1) < STEPS / 2  # epochs end mid-run
    single = run(tmp_path, tmp_path / "one", 1, mix_overrides(*sources))
    two = run(tmp_path, tmp_path / "two", 2, [*mix_overrides(*sources), "parallel.ep=2"])
    assert len(single) == len(two) == STEPS and single[-1] < single[0]
    for step, (a, b) in enumerate(zip(single, two), start=1):
        assert b == pytest.approx(a, rel=1e-4), f"step {step}: 1 process {a}, 2 ranks {b}"

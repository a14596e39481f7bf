"""The loop's parts on their own: TrainState, the cadences, the Checkpointer, Evaluator, TrainLogger
and the BatchPlan, on a small real model and real token files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_train.data import TokenFile, get_batch, write_tokens
from moe_train.metrics import MetricsWriter, read_metrics
from moe_train.parallel import ParallelConfig, ParallelState
from moe_train.training.batches import BatchPlan
from moe_train.training.cadence import Every
from moe_train.training.checkpointer import Checkpointer
from moe_train.training.evaluation import Evaluator, evaluate
from moe_train.training.logger import TrainLogger
from moe_train.training.step import train_step
from moe_train.training.train_state import TrainState
from tests.helpers.training import SEQ_LEN, engine_and_plan, small_cfg


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> TokenFile:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tokens") / "t.bin"
    return TokenFile(write_tokens(path, rng.integers(0, 256, 4000), 256, "byte"))


def test_train_state_round_trips_and_reads_old_extras():
    state = TrainState(step=7, best_val=3.25, skipped=2, last_loss=4.0)
    saved = {**state.state_dict(), "scaler": {"scale": 2.0}}  # a checkpoint's extra
    assert set(saved) == {"step", "best_val", "skipped", "scaler"}
    restored = TrainState()
    restored.load_state_dict(saved)
    assert (restored.step, restored.best_val, restored.skipped) == (7, 3.25, 2)
    assert math.isnan(restored.last_loss)  # not checkpointed: logged again after resume
    restored.finish_step(applied=False)
    restored.finish_step(applied=True)
    assert (restored.step, restored.skipped) == (9, 3)
    assert restored.summary()["skipped_steps"] == 3


def test_every_is_due_on_multiples_and_the_last_step():
    assert [s for s in range(1, 11) if Every(3, 10).due(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 5) if Every(1, 4).due(s)] == [1, 2, 3, 4]
    assert not any(Every(3, 10, enabled=False).due(s) for s in range(1, 11))


def test_batch_plan_splits_the_global_batch_over_ranks_and_micro_batches(tokens):
    whole = get_batch(tokens, 5, 3, 8, SEQ_LEN)[0]  # [8, T]
    pieces = []
    for rank in range(2):
        plan = BatchPlan(5, 8, SEQ_LEN, 2, 2, rank, 2, torch.device("cpu"))
        for x, y, offset, _ in plan.micro_batches(tokens, 3):
            assert x.shape == y.shape == (2, SEQ_LEN) and offset == len(pieces) * 2 * SEQ_LEN
            pieces.append(x)
    assert torch.equal(torch.cat(pieces), whole)


def test_checkpointer_saves_on_its_cadence_and_restores_the_run(tmp_path, tokens):
    cfg = small_cfg(precision="fp16")  # the engine's loss scaler goes into the extra too
    engine, plan = engine_and_plan(cfg)
    train_state, checkpointer = TrainState(), Checkpointer(tmp_path, Every(2, 5), keep=2)
    assert not checkpointer.restore(train_state, engine)  # nothing to resume
    for step in range(5):
        train_state.finish_step(train_step(engine, tokens, plan, step, 1e-3, rank=0).applied)
        train_state.best_val = 6.0 - step
        checkpointer.after_step(train_state, engine)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000005"]
    fresh, fresh_state = engine_and_plan(cfg)[0], TrainState()
    assert Checkpointer(tmp_path, Every(2, 5), keep=2).restore(fresh_state, fresh)
    assert fresh_state.state_dict() == train_state.state_dict()
    assert fresh.state_dict() == engine.state_dict()
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)


def test_evaluator_runs_on_its_cadence_and_keeps_the_best(tmp_path, tokens):
    engine, plan = engine_and_plan(small_cfg())
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    evaluator = Evaluator(
        tokens, plan, Every(2, 3), max_batches=2, mean_over_ranks=lambda t: t.clone(),
        writer=writer,
    )  # fmt: skip
    expected = evaluate(engine, tokens, plan, 2, lambda t: t.clone())
    train_state = TrainState(best_val=expected + 1)
    for step in (1, 2, 3):
        train_state.step = step
        evaluator.after_step(train_state, engine)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3]
    assert read_metrics(tmp_path)[0]["val_loss"] == pytest.approx(expected)
    assert train_state.best_val == pytest.approx(expected)
    off = Evaluator(
        tokens, plan, Every(1, 3, enabled=False), max_batches=2,
        mean_over_ranks=lambda t: t.clone(), writer=writer,
    )  # fmt: skip
    off.after_step(train_state, engine)
    assert len(read_metrics(tmp_path)) == 2


def test_logger_writes_its_records_on_its_cadence_and_cuts_resumed_metrics(tmp_path, tokens):
    cfg = small_cfg()
    engine, plan = engine_and_plan(cfg)
    old = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in (1, 2, 3):  # an earlier run logged up to step 3, its checkpoint is at step 2
        old.log(step, {"loss": 9.0})
    means = []

    def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
        means.append(float(t))
        return t.clone()

    t = cfg.trainer
    t.run_dir, t.log_every, t.max_steps, t.global_batch_size = str(tmp_path), 2, 5, 4
    t.tensorboard = t.progress = False
    parallel = ParallelState(ParallelConfig())
    parallel.all_reduce_mean = mean_over_ranks
    logger = TrainLogger(cfg, parallel, start=2)
    train_state = TrainState(step=2)
    for step in range(2, 5):
        out = train_step(engine, tokens, plan, step, 1e-3, rank=0)
        train_state.finish_step(out.applied)
        logger.after_step(train_state, out, engine)
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    new = records[2]
    assert train_state.last_loss == records[3]["loss"]  # the loss of the last log
    assert {"lr", "grad_norm", "tokens_per_s", "skipped_steps", "aux/balance"} <= set(new)
    assert any(k.startswith("moe0/") for k in new) and new["tokens_per_s"] > 0
    assert means[0] == records[2]["loss"]  # the loss went through the mean over ranks

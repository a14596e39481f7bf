"""The Engine protocol: the native engine's update (skip, clip, accumulate, loss scale, checkpoint
state), and a training run in which the loop touches gradients and the optimizer only through the
engine."""

from __future__ import annotations

import inspect

import pytest
import torch

from moe_train.engines import DeepSpeedEngine, Engine, NativeEngine
from moe_train.parallel import ParallelConfig, ParallelState, parallelize
from moe_train.training.train_state import TrainState


def linear_engine(*, grad_clip=0.0, grad_accum=1, amp_dtype=None, lr=1.0, adam=False):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    opt_cls = torch.optim.AdamW if adam else torch.optim.SGD
    optimizer = opt_cls(module.parameters(), lr=lr)
    parallel = ParallelState(ParallelConfig())  # one process: every collective is a no-op
    grad_sync = parallelize(module, parallel.dims, parallel.groups, parallel.cfg)
    engine = NativeEngine(
        grad_sync, optimizer, parallel,
        grad_accum=grad_accum, grad_clip=grad_clip, amp_dtype=amp_dtype,
    )  # fmt: skip
    return engine


def loss_of(engine: NativeEngine, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=g)  # [b, d]
    with engine.autocast():
        return engine.model(x).float().pow(2).mean()


def params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_non_finite_gradient_skips_the_step_and_the_loop_counts_it():
    engine, train_state = linear_engine(adam=True), TrainState()
    before = params(engine)
    with engine.micro_batch(last=True):
        engine.backward(loss_of(engine, 0) * float("nan"))
    applied = engine.step()
    train_state.finish_step(applied)
    assert applied is False and (train_state.step, train_state.skipped) == (1, 1)
    assert not torch.isfinite(torch.tensor(engine.grad_norm()))
    assert all(torch.equal(a, b) for a, b in zip(before, params(engine)))  # never applied
    assert all(p.grad is None for p in engine.module.parameters())  # cleared for the next step
    assert not engine.optimizer.state  # Adam's moments were not touched by NaN
    with engine.micro_batch(last=True):
        engine.backward(loss_of(engine, 1))
    train_state.finish_step(engine.step())
    assert (train_state.step, train_state.skipped) == (2, 1)
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, params(engine)))


def test_step_clips_to_the_global_norm_and_reports_it_unclipped():
    engine = linear_engine(grad_clip=0.01)
    before = params(engine)
    loss = loss_of(engine, 0)
    grads = torch.autograd.grad(loss, list(engine.module.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    assert norm > 0.01  # so clipping acts
    with engine.micro_batch(last=True):
        engine.backward(loss_of(engine, 0))
    assert engine.step()
    assert engine.grad_norm() == pytest.approx(float(norm), rel=1e-5)
    coef = 0.01 / (norm + 1e-6)
    for p0, g, p1 in zip(before, grads, params(engine)):  # SGD, lr 1: p1 = p0 - coef * g
        torch.testing.assert_close(p1, p0 - coef * g)


def test_accumulated_micro_batches_give_the_mean_gradient():
    engine = linear_engine(grad_accum=2)
    reference = linear_engine()
    mean_loss = (loss_of(reference, 0) + loss_of(reference, 1)) / 2
    with reference.micro_batch(last=True):
        reference.backward(mean_loss)
    reference.step()
    for m in range(2):
        with engine.micro_batch(last=m == 1):
            engine.backward(loss_of(engine, m))
    engine.step()
    for a, b in zip(params(reference), params(engine)):
        torch.testing.assert_close(a, b)


def test_fp16_loss_scale_backs_off_on_overflow_and_round_trips():
    engine = linear_engine(amp_dtype=torch.float16)
    scale = engine.state_dict()["scaler"]["scale"]
    with engine.micro_batch(last=True):
        engine.backward(loss_of(engine, 0) * float("inf"))
    assert engine.step() is False
    assert engine.state_dict()["scaler"]["scale"] == scale / 2
    fresh = linear_engine(amp_dtype=torch.float16)
    fresh.load_state_dict(engine.state_dict())
    assert fresh.state_dict() == engine.state_dict()


def test_both_engines_implement_the_protocol():
    wanted = {
        name
        for name, member in vars(Engine).items()
        if callable(member) and not name.startswith("_")
    }
    assert {"backward", "step", "grad_norm", "state_dict", "load_state_dict"} <= wanted
    for cls in (NativeEngine, DeepSpeedEngine):
        for name in wanted:
            ours = inspect.signature(getattr(cls, name)).parameters
            assert list(ours) == list(inspect.signature(getattr(Engine, name)).parameters), name


class RecordingEngine:
    """A real NativeEngine, recording the loop's calls and whether the optimizer's step and the
    parameters' gradients happen inside the engine."""

    def __init__(self, inner: NativeEngine):
        self.inner, self.calls, self.inside = inner, [], None
        self.model, self.module, self.optimizer = inner.model, inner.module, inner.optimizer
        self.optimizer_steps_outside = self.grads_outside = 0
        self.optimizer.register_step_pre_hook(self._on_optimizer_step)
        for p in self.module.parameters():
            p.register_hook(self._on_grad)

    def _on_optimizer_step(self, *_):
        self.optimizer_steps_outside += self.inside != "step"

    def _on_grad(self, grad):
        self.grads_outside += self.inside != "backward"
        return grad

    def _call(self, name, *args, **kwargs):
        self.calls.append(name)
        self.inside = name
        try:
            return getattr(self.inner, name)(*args, **kwargs)
        finally:
            self.inside = None

    def autocast(self):
        return self.inner.autocast()

    def micro_batch(self, last):
        self.calls.append(f"micro_batch(last={last})")
        return self.inner.micro_batch(last)

    def backward(self, loss):
        self._call("backward", loss)

    def step(self):
        return self._call("step")

    def grad_norm(self):
        return self.inner.grad_norm()

    def state_bytes(self):
        return self.inner.state_bytes()

    def state_dict(self):
        return self._call("state_dict")

    def load_state_dict(self, state):
        self._call("load_state_dict", state)

    def save_checkpoint(self, run_dir, step, extra, keep):
        self._call("save_checkpoint", run_dir, step, extra, keep)

    def finish_checkpoint(self):
        self._call("finish_checkpoint")

    def load_latest(self, run_dir):
        return self._call("load_latest", run_dir)


def test_the_loop_talks_to_the_engine_only(tmp_path, monkeypatch):
    import moe_train.train as train_mod
    from moe_train.config import TrainConfig, TrainerConfig
    from moe_train.model import ModelConfig

    engines = []
    real_build = train_mod.build_engine

    def recording_build(*args, **kwargs):
        engines.append(RecordingEngine(real_build(*args, **kwargs)))
        return engines[-1]

    monkeypatch.setattr(train_mod, "build_engine", recording_build)
    cfg = TrainConfig(seed=3)
    cfg.model = ModelConfig(seq_len=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, num_experts=4)
    cfg.model.moe_every = 1
    cfg.data.cache_dir, cfg.data.default_corpus_bytes = str(tmp_path / "corpus"), 400_000
    cfg.trainer = TrainerConfig(
        run_dir=str(tmp_path / "run"), max_steps=4, global_batch_size=4, micro_batch_size=2,
        precision="fp32", ckpt_every=2, eval_batches=0, progress=False, tensorboard=False,
    )  # fmt: skip
    summary = train_mod.train(cfg)
    engine = engines[0]
    one_step = ["micro_batch(last=False)", "backward", "micro_batch(last=True)", "backward", "step"]
    # every save first finishes the one in flight; the run's first save is waited for (and timed:
    # a stop's grace), the later ones are finished by the next save or at the end
    save = ["finish_checkpoint", "state_dict", "save_checkpoint"]
    assert engine.calls == [
        "load_latest",
        *one_step * 2,
        *save,
        "finish_checkpoint",
        *one_step * 2,
        *save,
        "finish_checkpoint",
    ]
    assert engine.optimizer_steps_outside == 0 and engine.grads_outside == 0
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert (tmp_path / "run" / "step_00000004").is_dir()

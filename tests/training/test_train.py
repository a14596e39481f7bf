"""The training application: config composition and errors, learning, exact resume, bad data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from moe_train.config import CONFIG_DIR, TrainConfig
from moe_train.data import DataError
from moe_train.metrics import read_metrics
from moe_train.train import lr_at, train
from tests.helpers.runs import compose_cfg, losses, tiny_cfg

GROUPS = ("model", "router", "parallel", "optim", "data", "trainer")
TRAIN_ONLY_MODELS = {"tiny", "small", "base"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(group):
    for name in options(group):
        cfg = compose_cfg(f"{group}={name}")
        assert isinstance(cfg, TrainConfig)
        cfg.validate()
        if group == "router":
            assert cfg.router.kind == name
        if group == "model":
            assert cfg.model.d_model > 0


def test_default_composition_is_the_documented_default():
    cfg = compose_cfg()
    assert (cfg.router.kind, cfg.model.d_model, cfg.data.dir) == ("switch", 128, None)
    assert cfg.trainer.run_dir == "runs/switch-d128x4-e8"


def test_misspelt_key_fails_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose_cfg("model.d_modle=64")
    assert "d_modle" in str(e.value) or "d_modle" in str(e.value.__cause__)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_cfg("model.d_model=wide")
    assert "d_model" in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["router=topk", "router.top_k=9"], "router.top_k"),
        (["router=sam", "router.num_groups=3"], "router.num_groups"),
        (["router=prototype", "router.top_k=3"], "router.top_k"),
        (["router.kind=sparse"], "router.kind"),
        (["router.capacity_factor=-1"], "router.capacity_factor"),
        (["model.n_heads=3"], "model.n_heads"),
        (["optim.lr=0"], "optim.lr"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["trainer.engine=jax"], "trainer.engine"),
        (["optim.lr=inf"], "optim.lr"),
        (["optim.weight_decay=nan"], "optim.weight_decay"),
        (["optim.grad_clip=nan"], "optim.grad_clip"),
        (["optim.beta2=1.0"], "optim.beta2"),
        (["trainer.threads=-1"], "trainer.threads"),
        (["trainer.host_memory=never"], "trainer.host_memory"),
        (["trainer.zero_stage=3"], "trainer.zero_stage"),
        (["trainer.eval_batches=-1"], "trainer.eval_batches"),
        (["data.default_corpus_bytes=10"], "data.default_corpus_bytes"),
    ],
)
def test_semantic_errors_name_the_field(overrides, field):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg.validate()


def test_batch_split_errors_name_the_fields():
    cfg = compose_cfg("trainer.global_batch_size=6", "trainer.micro_batch_size=4")
    with pytest.raises(ValueError, match="micro_batch_size"):
        cfg.trainer.batch_split(1)
    with pytest.raises(ValueError, match="global_batch_size"):
        cfg.trainer.batch_split(4)
    assert compose_cfg(
        "trainer.global_batch_size=8", "trainer.micro_batch_size=2"
    ).trainer.batch_split(2) == (2, 2)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = compose_cfg("optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1").optim
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A small default corpus in a private cache (fast to build, same code path)."""
    cache = tmp_path_factory.mktemp("corpus")
    return str(cache)


@pytest.mark.slow
def test_thirty_steps_lower_the_loss(tmp_path, small_data):
    summary = train(tiny_cfg(tmp_path / "run", small_data, "trainer.ckpt_every=100"))
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 31))
    assert curve[30] < curve[1] - 1.0  # bytes start near ln(256) = 5.5
    assert summary["best_val_loss"] < 5.0
    records = read_metrics(tmp_path / "run")
    assert any("moe0/load_cv" in r and "aux/balance" in r for r in records)
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize("router", ["switch", "topk"])  # topk: random routing noise must resume too
def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, small_data, router):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(
        tiny_cfg(
            full, small_data, f"router={router}", "trainer.max_steps=16", "trainer.ckpt_every=8"
        )
    )
    # the interrupted run: only the step-8 checkpoint and the metrics up to it survived
    resumed.mkdir()
    shutil.copytree(full / "step_00000008", resumed / "step_00000008")
    (resumed / "latest").write_text("step_00000008\n")
    summary = train(
        tiny_cfg(
            resumed, small_data, f"router={router}", "trainer.max_steps=16", "trainer.ckpt_every=8"
        )
    )
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(9, 17))
    for step in range(9, 17):
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    assert summary["steps"] == 16


def test_finished_run_resumes_to_nothing(tmp_path, small_data):
    run = tmp_path / "run"
    train(tiny_cfg(run, small_data, "trainer.max_steps=4", "trainer.ckpt_every=2"))
    before = (run / "metrics.jsonl").read_text()
    train(tiny_cfg(run, small_data, "trainer.max_steps=4", "trainer.ckpt_every=2"))
    assert (run / "metrics.jsonl").read_text() == before  # already done: nothing re-run


def test_corrupt_data_gives_a_named_error(tmp_path, small_data):
    from moe_train.data import default_corpus_dir

    src = default_corpus_dir(max_bytes=400000, cache_dir=small_data)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    with open(bad / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(bad / "train.bin") - 1)
    with pytest.raises(DataError, match="train.bin"):
        train(tiny_cfg(tmp_path / "run", small_data, f"data.dir={bad}"))
    with pytest.raises(DataError, match="missing"):
        train(tiny_cfg(tmp_path / "run", small_data, f"data.dir={tmp_path / 'missing'}"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_router(tmp_path, small_data, precision):
    summary = train(
        tiny_cfg(
            tmp_path / "run", small_data, f"trainer.precision={precision}", "trainer.max_steps=6"
        )
    )
    curve = losses(tmp_path / "run")
    assert len(curve) == 6 and all(v == v for v in curve)  # finite, no NaN
    assert (
        summary["skipped_steps"] == 0 or precision == "fp16"
    )  # fp16 may skip while the scale settles


def test_non_finite_loss_skips_the_step_and_counts_it(tmp_path, small_data, monkeypatch):
    import torch

    import moe_train.training.step as step_mod

    real = step_mod.lm_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, aux = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), aux) if calls["n"] == 3 else (loss, aux)

    monkeypatch.setattr(step_mod, "lm_loss", poisoned)
    summary = train(
        tiny_cfg(tmp_path / "run", small_data, "trainer.max_steps=5", "trainer.eval_batches=0")
    )
    assert summary["skipped_steps"] == 1
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert all(
        torch.isfinite(torch.tensor(r["loss"])) for r in records[3:]
    )  # weights stayed finite


def test_apex_optimizer_without_apex_says_what_to_do(tmp_path, small_data):
    import importlib.util

    if importlib.util.find_spec("apex") is not None:
        pytest.skip("apex is installed here")
    with pytest.raises(RuntimeError, match="optim.impl=torch"):
        train(tiny_cfg(tmp_path / "run", small_data, "optim.impl=apex"))

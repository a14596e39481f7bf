"""Every bad value fails at start from the command line, naming its key, before anything runs:
one NaN (or out-of-range value) per config group of `moe-train` and `moe-train-plan`."""

from __future__ import annotations

import re
import sys

import pytest

from moe_train.training.run_dir import RunFolderError, check_same_config


def run_cli(monkeypatch, capsys, main, argv: list[str], key: str) -> None:
    """Run a Hydra console script in-process: it must exit non-zero with an error that names
    `key` (`key: ...` from moe-train's checks, `full_key: key` from OmegaConf's type check; the
    echo of the overrides, `key=value`, does not count)."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err + str(exit_.value.code)
    assert re.search(rf"(^|\s){re.escape(key)}:|full_key: {re.escape(key)}\b", err), err[-2000:]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dropout=nan", "model.dropout"),
        ("model.init_std=-0.02", "model.init_std"),
        ("router.capacity_factor=nan", "router.capacity_factor"),
        ("router.z_loss_coef=nan", "router.z_loss_coef"),
        ("parallel.timeout_s=nan", "parallel.timeout_s"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.grad_clip=nan", "optim.grad_clip"),
        ("data.default_corpus_bytes=nan", "data.default_corpus_bytes"),  # an int: the type check
        ("trainer.threads=-1", "trainer.threads"),
        ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps"),
    ],
)
def test_train_cli_names_the_bad_key_before_anything_runs(
    tmp_path, monkeypatch, capsys, override, key
):
    from moe_train.train import main

    run = tmp_path / "run"
    argv = ["moe-train", "model=tiny", "trainer=ci", f"trainer.run_dir={run}", override]
    run_cli(monkeypatch, capsys, main, argv, key)
    assert not run.exists() or not any(run.iterdir())  # nothing written, no lock taken


@pytest.mark.parametrize(
    "override, key",
    [
        ("cluster.tflops=nan", "cluster.tflops"),
        ("cluster.gpu_memory_gb=inf", "cluster.gpu_memory_gb"),
        ("plan.encoder_decoder.relative_buckets=-1", "plan.encoder_decoder.relative_buckets"),
        ("plan.encoder_decoder.d_kv=0", "plan.encoder_decoder.d_kv"),
    ],
)
def test_plan_cli_names_the_bad_key(monkeypatch, capsys, override, key):
    from moe_train.plan.cli import main

    argv = [
        "moe-train-plan",
        "plan.architecture=encoder_decoder",
        "plan.meta_check=false",
        override,
    ]
    run_cli(monkeypatch, capsys, main, argv, key)


def test_deepspeed_checkpoints_count_for_the_config_check(tmp_path):
    """A folder whose only checkpoint is DeepSpeed's still belongs to its configuration."""
    from omegaconf import OmegaConf

    from tests.helpers.runs import compose_cfg

    cfg = compose_cfg("trainer.engine=deepspeed", f"trainer.run_dir={tmp_path}")
    OmegaConf.save(OmegaConf.structured(cfg), tmp_path / "config.yaml")
    check_same_config(tmp_path, compose_cfg("trainer.engine=deepspeed", "model.d_model=64"))
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "latest").write_text("step_00000010")
    with pytest.raises(RunFolderError, match="model.d_model: 128 -> 64"):
        check_same_config(tmp_path, compose_cfg("trainer.engine=deepspeed", "model.d_model=64"))

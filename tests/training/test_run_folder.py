"""The run folder as an operator meets it: one run at a time, one configuration, torn metrics, a
finished run started again, nothing left to resume, a damaged checkpoint, a diverging run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import moe_train.training.step as step_mod
from moe_train.checkpoint import verify_checkpoint
from moe_train.metrics import read_metrics
from moe_train.train import train
from moe_train.training.divergence import TrainingDiverged
from moe_train.training.run_dir import RunFolderError, RunFolderLock, config_changes
from tests.helpers.runs import losses, tiny_cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The default corpus's cache, built once for the module."""
    return str(tmp_path_factory.mktemp("corpus"))


STEPS4 = ("trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.eval_batches=0")


def test_second_run_in_a_locked_folder_fails_naming_the_holder(tmp_path, corpus):
    run = tmp_path / "run"
    holder = RunFolderLock(run)
    holder.acquire()  # another run holds the folder (a second open file: flock conflicts)
    try:
        with pytest.raises(RunFolderError, match=rf"{run} is in use by process {os.getpid()} on"):
            train(tiny_cfg(run, corpus, *STEPS4))
        assert not (run / "metrics.jsonl").exists()  # failed before anything was written
    finally:
        holder.release()
    train(tiny_cfg(run, corpus, *STEPS4))  # released: the folder is free again
    assert sorted(losses(run)) == [1, 2, 3, 4]


@pytest.mark.distributed
def test_two_ranks_both_exit_nonzero_when_the_folder_is_locked(tmp_path, corpus):
    run = tmp_path / "run"
    holder = RunFolderLock(run)
    holder.acquire()
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "moe_train.train", "model=tiny", "trainer=ci", f"trainer.run_dir={run}",
        f"data.cache_dir={corpus}", "data.default_corpus_bytes=400000",
        "parallel.timeout_s=60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.release()
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by process {os.getpid()}") >= 2, proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()


def test_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus, *STEPS4))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # killed mid-write
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl:5: dropping a torn last line"):
        train(tiny_cfg(run, corpus, "trainer.max_steps=6", *STEPS4[1:]))
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):  # damage before the end: named
        read_metrics(run)


def test_resume_with_another_configuration_names_the_keys(tmp_path, corpus):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus, *STEPS4))
    saved = (run / "config.yaml").read_text()
    other = tiny_cfg(run, corpus, *STEPS4, "data.default_corpus_bytes=300000", "seed=7")
    with pytest.raises(RunFolderError, match=r"data.default_corpus_bytes: 400000 -> 300000.*seed"):
        train(other)
    assert (run / "config.yaml").read_text() == saved  # the old run's config is untouched
    # the schedule, the layout and the log cadence may change on resume
    summary = train(
        tiny_cfg(run, corpus, "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.log_every=2",
                 "trainer.eval_batches=0", "parallel.overlap_grad_sync=false")
    )  # fmt: skip
    assert summary["steps"] == 6
    assert config_changes({"trainer": {"max_steps": 1}}, {"trainer": {"max_steps": 2}}) == []
    # model.vocab_size null (the data's) is filled in after the check; an explicit one is checked
    assert config_changes({"model": {"vocab_size": 320}}, {"model": {"vocab_size": None}}) == []
    assert config_changes({"model": {"vocab_size": 320}}, {"model": {"vocab_size": 512}}) != []


def test_finished_run_says_there_is_nothing_to_do(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    first = train(tiny_cfg(run, corpus, *STEPS4))
    capsys.readouterr()
    again = train(tiny_cfg(run, corpus, *STEPS4))
    out = capsys.readouterr().out
    assert "already at step 4 (trainer.max_steps=4); nothing to do" in out
    assert f"loss {first['final_loss']:.4f}" in out and "nan" not in out
    assert again["final_loss"] == first["final_loss"] and again["steps"] == 4


def test_no_complete_checkpoint_restarts_and_keeps_the_old_metrics(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus, *STEPS4))
    old = (run / "metrics.jsonl").read_text()
    for d in run.glob("step_*"):
        os.remove(d / "meta.pt")  # every checkpoint incomplete
    capsys.readouterr()
    train(tiny_cfg(run, corpus, *STEPS4))
    err = capsys.readouterr().err
    assert "no complete checkpoint to resume from" in err and "starting at step 0" in err
    assert f"moved to {run / 'previous_1'}" in err
    assert (run / "previous_1" / "metrics.jsonl").read_text() == old
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_resume_false_sets_the_earlier_run_aside(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus, "trainer.max_steps=6", *STEPS4[1:]))
    train(tiny_cfg(run, corpus, *STEPS4, "trainer.resume=false"))
    assert "trainer.resume=false: starting at step 0" in capsys.readouterr().err
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (run / "previous_1" / "step_00000006").is_dir()  # not mixed with the new run's


def test_corrupted_latest_checkpoint_resumes_from_the_one_before(tmp_path, corpus):
    """The probe of issue #13: 4 bytes overwritten in the newest shard. The run warns naming the
    file, resumes from the previous checkpoint, repeats the same losses and keeps good ones."""
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus, *STEPS4))
    before = losses(run)
    shard = run / "step_00000004" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 3)
        f.write(b"\xff\xff\x7f\x7f")
    with pytest.warns(RuntimeWarning, match=r"step_00000004/__0_0.distcp: checksum"):
        summary = train(tiny_cfg(run, corpus, "trainer.max_steps=6", *STEPS4[1:]))
    after = losses(run)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for s in (3, 4):  # resumed from step 2: the same steps again, the same losses
        assert after[s] == pytest.approx(before[s], rel=1e-6)
    assert summary["skipped_steps"] == 0 and summary["final_loss"] < before[1]
    assert (run / ".corrupt_step_00000004").is_dir()
    for d in run.glob("step_*"):
        verify_checkpoint(d)


def test_run_stops_after_max_skipped_steps(tmp_path, corpus, monkeypatch):
    real = step_mod.lm_loss
    calls = {"n": 0}

    def diverged_from_step_3(*args, **kwargs):
        loss, aux = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), aux) if calls["n"] >= 3 else (loss, aux)

    monkeypatch.setattr(step_mod, "lm_loss", diverged_from_step_3)
    cfg = tiny_cfg(tmp_path / "run", corpus, "trainer.max_steps=30", "trainer.eval_batches=0")
    cfg.trainer.max_skipped_steps = 4
    with pytest.raises(TrainingDiverged, match=r"last 4 steps \(3 to 6\).*max_skipped_steps=4"):
        train(cfg)
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert records[-1]["step"] == 6 and records[-1]["skipped_steps"] == 4


def test_diverging_lr_exits_nonzero_from_the_command_line(tmp_path, corpus, monkeypatch, capsys):
    from moe_train.train import main

    run = tmp_path / "run"
    argv = [
        "moe-train", "model=tiny", "trainer=ci", f"trainer.run_dir={run}", "optim.lr=1000",
        "optim.warmup_steps=0", "trainer.max_skipped_steps=3", "trainer.eval_batches=0",
        f"data.cache_dir={corpus}", "data.default_corpus_bytes=400000",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code not in (0, None)
    assert "training diverged" in capsys.readouterr().err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] < 30  # stopped early


def test_rank_0_records_the_config_and_the_tokenizer_and_other_ranks_write_nothing(tmp_path):
    from omegaconf import OmegaConf

    from moe_train.config import TrainConfig
    from moe_train.training.run_dir import RunFolder

    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_text('{"model": "bpe"}')
    cfg = TrainConfig(seed=11)
    cfg.model.vocab_size = 320  # a value filled in at start: the record holds it
    other = RunFolder(tmp_path / "other", None, is_main=False)
    other.record(cfg, data, "tokenizer.json")
    assert not (tmp_path / "other").exists()
    main = RunFolder(tmp_path / "run", None, is_main=True)
    main.record(cfg, data, "tokenizer.json")
    saved = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(TrainConfig), OmegaConf.load(tmp_path / "run" / "config.yaml")
        )
    )
    assert saved == cfg
    assert (tmp_path / "run" / "tokenizer.json").read_text() == '{"model": "bpe"}'

"""Single-process checkpoints: round trip, atomic publish, crash safety, pruning, clear errors.
(Distributed save at ep=2 and loads at ep=4 / ep=1: tests/parallel/test_ep_parity.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from moe_train.checkpoint import save as ck
from moe_train.model import ModelConfig
from tests.helpers import python_env
from tests.helpers.checkpoint import CFG, make, step


def test_round_trip_resumes_the_same_loss_curve(tmp_path):
    model, opt = make()
    for i in range(2):
        step(model, opt, i)
    path = save_checkpoint(tmp_path, 2, model, opt, {"step": 2, "rng": torch.get_rng_state()})
    assert path == tmp_path / "step_00000002" and latest_checkpoint(tmp_path) == path
    expected = [step(model, opt, i) for i in range(2, 4)]

    model2, opt2 = make(seed=9)
    extra = load_checkpoint(path, model2, opt2)
    assert extra["step"] == 2 and torch.equal(extra["rng"], torch.get_rng_state()) in (True, False)
    assert [step(model2, opt2, i) for i in range(2, 4)] == expected


def test_keep_prunes_old_checkpoints_and_resave_replaces(tmp_path):
    model, opt = make()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, model, opt, {"step": s}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    save_checkpoint(tmp_path, 3, model, opt, {"step": 33}, keep=2)  # same step again
    assert load_checkpoint(latest_checkpoint(tmp_path), model, opt)["step"] == 33
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"


def test_crash_before_publish_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})

    def crash(tmp, final):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2})
    assert (tmp_path / ".tmp_step_00000002").exists()  # the partial save is left behind
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), *make(seed=3))["step"] == 1
    monkeypatch.undo()
    save_checkpoint(tmp_path, 2, model, opt, {"step": 2})  # the next save cleans up
    assert not list(tmp_path.glob(".tmp_step_*"))
    assert load_checkpoint(latest_checkpoint(tmp_path), model, opt)["step"] == 2


@pytest.mark.slow
def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path):
    """A real process dies (SIGKILL-like os._exit) after the shards are written, before publish."""
    script = textwrap.dedent(
        f"""
        import os
        from tests.helpers.checkpoint import make
        from moe_train.checkpoint import save as ck
        model, opt = make()
        ck.save_checkpoint({str(tmp_path)!r}, 1, model, opt, {{"step": 1}})
        ck._publish = lambda tmp, final: os._exit(9)
        ck.save_checkpoint({str(tmp_path)!r}, 2, model, opt, {{"step": 2}})
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], timeout=120, capture_output=True, env=python_env()
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert (tmp_path / ".tmp_step_00000002").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), *make(seed=4))["step"] == 1


def test_latest_pointer_to_incomplete_dir_falls_back(tmp_path):
    model, opt = make()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    (tmp_path / "step_00000005").mkdir()  # e.g. copied by hand, no metadata
    (tmp_path / "latest").write_text("step_00000005\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert latest_checkpoint(tmp_path / "nothing_here") is None


def test_errors_name_the_path(tmp_path):
    model, opt = make()
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "missing", model, opt)
    path = save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    # different expert count
    other = ModelConfig(**{**CFG.__dict__, "num_experts": 8})
    with pytest.raises(CheckpointError, match=r"step_00000001.*experts"):
        load_checkpoint(path, *make(cfg=other))
    # different width
    wide = ModelConfig(**{**CFG.__dict__, "d_ff": 32})
    with pytest.raises(CheckpointError, match=r"step_00000001.*shape"):
        load_checkpoint(path, *make(cfg=wide))
    # corrupt metadata
    (path / "meta.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"step_00000001.*cannot read"):
        load_checkpoint(path, model, opt)
    os.remove(path / "meta.pt")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(path, model, opt)

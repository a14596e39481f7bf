"""Damaged checkpoints never load silently: per-file checksums, named errors, fallback to the newest
checkpoint that verifies; a full disk, a stray `latest` and a killed re-save are handled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_train.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from moe_train.checkpoint import save as ck
from moe_train.checkpoint.checksums import CHECKSUM_FILE, read_checksums
from tests.helpers import python_env
from tests.helpers.checkpoint import make, step

SHARD = "__0_0.distcp"


def two_checkpoints(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """step_1 and step_2 of a training model; the parameters at each."""
    model, opt = make()
    step(model, opt, 0)
    save_checkpoint(run_dir, 1, model, opt, {"step": 1})
    at_1 = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, opt, 1)
    save_checkpoint(run_dir, 2, model, opt, {"step": 2})
    return at_1, {k: v.clone() for k, v in model.state_dict().items()}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_every_file_is_checksummed(tmp_path):
    two_checkpoints(tmp_path)
    files = read_checksums(tmp_path / "step_00000002")
    assert isinstance(files, dict)
    assert set(files) == {SHARD, ".metadata", "meta.pt"}
    assert files[SHARD]["size"] == (tmp_path / "step_00000002" / SHARD).stat().st_size


def test_corrupted_shard_is_named_and_the_newest_good_checkpoint_loads(tmp_path):
    at_1, _ = two_checkpoints(tmp_path)
    shard = tmp_path / "step_00000002" / SHARD
    overwrite(shard, shard.stat().st_size // 2, b"\xff\xff\x7f\x7f")  # 4 bytes: a 3.4e38 float
    with pytest.raises(CorruptCheckpointError, match=rf"step_00000002/{SHARD}: checksum"):
        load_checkpoint(tmp_path / "step_00000002", *make(seed=5))
    model, opt = make(seed=5)
    with pytest.warns(
        RuntimeWarning, match=rf"{SHARD}: checksum.*moved to .*corrupt_step_00000002"
    ):
        path, extra = load_latest_checkpoint(tmp_path, model, opt)
    assert path == tmp_path / "step_00000001" and extra == {"step": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, at_1[k]), k
    assert (tmp_path / ".corrupt_step_00000002").is_dir()  # kept for inspection, never loaded
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    # the next saves never prune the checkpoint that verified in favour of the damaged one
    save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001", "step_00000002"]
    for p in tmp_path.glob("step_*"):
        verify_checkpoint(p)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda d: os.truncate(d / SHARD, (d / SHARD).stat().st_size // 2), SHARD),
        (lambda d: (d / ".metadata").write_bytes(b""), ".metadata"),
        (lambda d: os.remove(d / SHARD), f"{SHARD} is missing"),
    ],
    ids=["truncated-shard", "empty-metadata", "missing-shard"],
)
@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "format-1"])
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(
    tmp_path, damage, named, checksums
):
    two_checkpoints(tmp_path)
    path = tmp_path / "step_00000002"
    if not checksums:  # a checkpoint saved before checksums.json: the structural check
        meta = torch.load(path / "meta.pt", weights_only=False)
        torch.save({**meta, "format": 1}, path / "meta.pt")
        os.remove(path / CHECKSUM_FILE)
    damage(path)
    with pytest.raises(CorruptCheckpointError) as err:
        load_checkpoint(path, *make(seed=5))
    assert str(path) in str(err.value) and named in str(err.value)
    assert len(str(err.value).splitlines()) == 1  # one sentence, not a traceback
    with pytest.warns(RuntimeWarning, match="damaged"):
        found = load_latest_checkpoint(tmp_path, *make(seed=5))
    assert found is not None and found[1] == {"step": 1}


def test_unverified_read_failure_is_a_checkpoint_error_naming_the_folder(tmp_path):
    """torch's CheckpointException (a BaseException) never escapes: verify=False skips the checks
    and lets DCP meet the truncated shard."""
    two_checkpoints(tmp_path)
    path = tmp_path / "step_00000002"
    os.truncate(path / SHARD, (path / SHARD).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"step_00000002: reading the tensors failed.*rank 0"):
        load_checkpoint(path, *make(seed=5), verify=False)


def test_every_checkpoint_damaged_loads_nothing(tmp_path):
    two_checkpoints(tmp_path)
    for d in tmp_path.glob("step_*"):
        overwrite(d / SHARD, 100, b"\x00\x01\x02\x03")
    with pytest.warns(RuntimeWarning):
        assert load_latest_checkpoint(tmp_path, *make(seed=5)) is None
    assert not list(tmp_path.glob("step_*"))
    assert len(list(tmp_path.glob(".corrupt_step_*"))) == 2


def test_latest_pointing_outside_the_run_folder_is_refused(tmp_path):
    two_checkpoints(tmp_path / "other")
    run = tmp_path / "run"
    model, opt = make()
    save_checkpoint(run, 1, model, opt, {"step": 1})
    for target in ("../other/step_00000002", str(tmp_path / "other" / "step_00000002"), "."):
        (run / "latest").write_text(target + "\n")
        with pytest.warns(RuntimeWarning, match="not a step_\\* folder inside"):
            assert latest_checkpoint(run) == run / "step_00000001"


def test_killed_resave_leaves_nothing_behind(tmp_path, monkeypatch):
    model, opt = make()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    save_checkpoint(tmp_path, 2, model, opt, {"step": 2})

    def killed(tmp, final):  # after step_2 was moved to .old_step_2, before the new one is in
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 22})
    monkeypatch.undo()
    assert not (tmp_path / "step_00000002").exists() and (tmp_path / ".old_step_00000002").is_dir()
    path, extra = load_latest_checkpoint(tmp_path, *make(seed=3))  # the old copy still counts
    assert path == tmp_path / ".old_step_00000002" and extra == {"step": 2}
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step_00000001", "step_00000002", "step_00000003",
    ]  # fmt: skip
    # killed after publishing, before the old copy was removed: the next save removes it
    shutil.copytree(tmp_path / "step_00000002", tmp_path / ".old_step_00000002")
    save_checkpoint(tmp_path, 4, model, opt, {"step": 4}, keep=3)
    assert not list(tmp_path.glob(".old_*"))


def _dev_full_at(monkeypatch, name: str, after_dcp: bool) -> None:
    """Make the save write `name` inside its temp folder into /dev/full (every write: ENOSPC)."""
    real = ck.dcp.save

    def save(sd, *, storage_writer, **kw):
        target = Path(storage_writer.path) / name
        if not after_dcp:
            target.symlink_to("/dev/full")
        out = real(sd, storage_writer=storage_writer, **kw)
        if after_dcp:
            target.symlink_to("/dev/full")
        return out

    monkeypatch.setattr(ck.dcp, "save", save)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "name, after_dcp", [(SHARD, False), (".meta.pt.tmp", True)], ids=["shard", "meta"]
)
def test_disk_full_save_says_so_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, name, after_dcp
):
    model, opt = make()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    _dev_full_at(monkeypatch, name, after_dcp)
    with pytest.raises(CheckpointError, match=r"the disk is full .*\.tmp_step_00000002") as err:
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2})
    assert "step_00000001 is intact" in str(err.value)
    monkeypatch.undo()
    assert not (tmp_path / ".tmp_step_00000002").exists()  # the space is given back
    assert load_latest_checkpoint(tmp_path, *make(seed=3))[1] == {"step": 1}


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(tmp_path):
    """A 1 MiB tmpfs (in a user namespace): fill it, then save."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = textwrap.dedent(
        f"""
        from tests.helpers.checkpoint import make
        from moe_train.checkpoint import CheckpointError, save_checkpoint
        model, opt = make()
        save_checkpoint({str(mnt / "run")!r}, 1, model, opt, {{"step": 1}})
        try:
            with open({str(mnt / "filler")!r}, "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError:
            pass
        try:
            save_checkpoint({str(mnt / "run")!r}, 2, model, opt, {{"step": 2}})
        except CheckpointError as e:
            print("ERROR", e)
        """
    )
    (tmp_path / "full.py").write_text(script)
    inner = f"mount -t tmpfs -o size=1m tmpfs {mnt} && {sys.executable} {tmp_path / 'full.py'}"
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", inner], capture_output=True, text=True, timeout=300,
        env=python_env(),
    )  # fmt: skip
    if "mount:" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the disk is full" in proc.stdout and ".tmp_step_00000002" in proc.stdout, proc.stdout


def test_checksums_file_is_valid_json_with_sizes(tmp_path):
    two_checkpoints(tmp_path)
    data = json.loads((tmp_path / "step_00000001" / CHECKSUM_FILE).read_text())
    assert data["algorithm"] == "crc32"
    assert all(len(e["crc32"]) == 8 and e["size"] > 0 for e in data["files"].values())

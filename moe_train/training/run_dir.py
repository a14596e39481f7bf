"""The run folder (trainer.run_dir) belongs to one run at a time and to one configuration.

- One run at a time: rank 0 holds an exclusive `fcntl.flock` on run_dir/.lock for the whole run
  (the OS releases it when the process dies, even on kill -9); a second run fails at start naming
  the folder and the process that holds it. Every rank learns rank 0's verdict before training.
  (On NFS the lock needs the server's lock support, on Lustre the `flock` mount option.)
- One configuration: a run resumes only with the configuration its config.yaml records, except
  for the keys in MAY_CHANGE (the schedule of logs and checkpoints, the parallel layout, ...); a
  differing key fails at start naming it.
- A run that starts at step 0 in a folder an earlier run left files in (no complete checkpoint,
  or trainer.resume=false) moves those files to run_dir/previous_<n>/ and says so.
- The run's own files: rank 0 writes config.yaml (the composed config, which a resume is checked
  against and the inference tools load) and copies the data's tokenizer file (tokenizer.json).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import checkpoint_candidates
from ..config_help import dotted
from ..data.tokenizers import copy_tokenizer_files
from ..model import with_legacy_body
from ..parallel.objects import from_main

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..parallel import ParallelState

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented; moe-train targets Linux)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
# Keys that may differ between a run folder's config.yaml and a run resuming it: the loop's
# length and cadences, where things are written, the layout (checkpoints reshard) and precision.
# A key (or a prefix ending in ".") not listed here must stay the same. New keys are compared only
# when both configs have them.
MAY_CHANGE = (
    "trainer.max_steps", "trainer.log_every", "trainer.eval_every", "trainer.eval_batches",
    "trainer.ckpt_every", "trainer.keep_checkpoints", "trainer.run_dir", "trainer.resume",
    "trainer.progress", "trainer.tensorboard", "trainer.threads", "trainer.micro_batch_size",
    "trainer.precision", "trainer.max_skipped_steps", "parallel.", "data.cache_dir", "optim.impl",
    "trainer.wandb", "trainer.wandb_project", "trainer.wandb_run_name", "trainer.print_config",
    "trainer.async_checkpoint", "trainer.activation_checkpointing", "data.verify_checksums",
    "trainer.stop_signals", "trainer.time_limit", "trainer.stall_timeout_s", "trainer.host_memory",
)  # fmt: skip
# what an earlier run leaves behind (moved aside when a new run starts at step 0)
LEFTOVERS = ("metrics.jsonl", "tb", "latest", "deepspeed", CONFIG_FILE)
LEFTOVER_PREFIXES = ("step_", ".tmp_step_", ".old_step_", ".corrupt_step_")


class RunFolderError(RuntimeError):
    """The run folder is in use by another run, or holds a run of another configuration."""


class RunFolderLock:
    """An exclusive, non-blocking flock on run_dir/.lock, which records who holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file: Any = None

    def acquire(self) -> None:
        """Take the lock or raise RunFolderError naming the folder and the holder."""
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderError(
                f"trainer.run_dir={self.path.parent} is in use by {holder} (it holds "
                f"{self.path}). Wait for that run to finish or stop it, or give this run "
                "another trainer.run_dir"
            ) from None
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        f.write(f"process {os.getpid()} on {socket.gethostname()} (started {started})\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`key: saved -> now` for every key both configs have that differs and may not change.

    A null in `now` (e.g. model.vocab_size: the data's) is filled in at start, after this check;
    the saved config holds the filled-in value, which the checkpoint's shapes then enforce."""
    a, b = dotted(saved), dotted(now)
    return [
        f"{k}: {a[k]!r} -> {b[k]!r}"
        for k in sorted(a.keys() & b.keys())
        if a[k] != b[k] and b[k] is not None and not may_change(k)
    ]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether run_dir holds a checkpoint a run would resume from (native or DeepSpeed)."""
    return bool(checkpoint_candidates(run_dir)) or (run_dir / "deepspeed" / "latest").is_file()


def check_same_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Raise RunFolderError naming the keys when run_dir's checkpoints come from a configuration
    that differs from `cfg` in keys outside MAY_CHANGE."""
    from omegaconf import OmegaConf

    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file() or not has_checkpoint(run_dir):
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        saved["model"] = with_legacy_body(saved["model"])  # an older run: the GPT-2 body's values
    now = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    changes = config_changes(saved, now)  # type: ignore[arg-type]
    if changes:
        raise RunFolderError(
            f"trainer.run_dir={run_dir} holds a run of another configuration ({saved_path} -> "
            f"this run): {'; '.join(changes)}. Give this run its own trainer.run_dir, or set "
            "trainer.resume=false to start over in this folder (the earlier run's files are "
            f"moved aside), or, to continue that run with these values, edit them into "
            f"{saved_path}. Keys that may change on resume: {', '.join(MAY_CHANGE)}"
        )


def _leftovers(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [
        p for p in run_dir.iterdir() if p.name in LEFTOVERS or p.name.startswith(LEFTOVER_PREFIXES)
    ]
    if all(p.name == CONFIG_FILE for p in found):
        return []  # a config alone (a run that stopped before it logged): overwritten
    return sorted(found)


def set_aside(run_dir: Path) -> tuple[Path, list[str]] | None:
    """Move an earlier run's files into run_dir/previous_<n>/; (that folder, the names moved), or
    None when there was nothing to move."""
    found = _leftovers(run_dir)
    if not found:
        return None
    n = 1
    while (run_dir / f"previous_{n}").exists():
        n += 1
    dest = run_dir / f"previous_{n}"
    dest.mkdir()
    for p in found:
        os.rename(p, dest / p.name)
    return dest, [p.name for p in found]


class RunFolder:
    """The run folder as this process holds it: rank 0 holds the lock and writes the files; on
    the other ranks `start_fresh` and `record` do nothing."""

    def __init__(self, run_dir: Path, lock: RunFolderLock | None, is_main: bool):
        self.path, self.lock, self.is_main = run_dir, lock, is_main

    @classmethod
    def open(cls, cfg: TrainConfig, parallel: ParallelState) -> RunFolder:
        """Rank 0 takes the lock and checks the configuration; every rank raises rank 0's
        RunFolderError (collective), so no rank trains when rank 0 may not."""
        run_dir = Path(cfg.trainer.run_dir)
        is_main = parallel.dims.is_main
        lock = RunFolderLock(run_dir) if is_main else None

        def claim() -> None:
            assert lock is not None
            lock.acquire()
            try:
                if cfg.trainer.resume:
                    check_same_config(run_dir, cfg)
            except BaseException:
                lock.release()
                raise

        from_main(parallel, claim)
        return cls(run_dir, lock, is_main)

    def start_fresh(self, resume: bool) -> None:
        """When the run starts at step 0: move an earlier run's files aside, say so (rank 0)."""
        if not self.is_main:
            return
        moved = set_aside(self.path)
        if moved is None:
            return
        dest, names = moved
        why = (
            "trainer.resume=false"
            if not resume
            else f"no complete checkpoint to resume from in {self.path}"
        )
        print(
            f"moe-train: warning: {why}: starting at step 0; the earlier run's files "
            f"({', '.join(names)}) were moved to {dest}",
            file=sys.stderr,
        )

    def record(self, cfg: TrainConfig, data_dir: Path, tokenizer: str) -> None:
        """Rank 0, before the first step: write the composed config as config.yaml (with the
        values filled in at start, e.g. model.vocab_size) and copy the tokenizer file the data
        folder names (`tokenizer`, as TokenFile.tokenizer says) as tokenizer.json."""
        if not self.is_main:
            return
        from omegaconf import OmegaConf

        self.path.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), self.path / CONFIG_FILE)
        copy_tokenizer_files(data_dir, tokenizer, self.path)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


__all__ = [
    "MAY_CHANGE",
    "RunFolder",
    "RunFolderError",
    "RunFolderLock",
    "check_same_config",
    "config_changes",
    "set_aside",
]

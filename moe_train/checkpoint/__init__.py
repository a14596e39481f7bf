"""Atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

    keys.py       the model's tensors (and optimizer state) as keys, experts along the global axis
    save.py       save_checkpoint, save_checkpoint_async: temp folder, checksums, atomic publish
    folder.py     a run folder's checkpoints: step_*, `latest`, candidates, prune, quarantine
    load.py       verify_checkpoint, load_checkpoint (fit, optimizer), load_latest_checkpoint
    checksums.py  checksums.json: size and CRC-32 of every file, hashed by all ranks in parallel
    errors.py     CheckpointError, CorruptCheckpointError

A save is written into a temp dir, checksummed, renamed into place, then `latest` is replaced
atomically: a crash at any point leaves the previous checkpoint loadable. A load verifies every
file first; `load_latest_checkpoint` falls back to the newest checkpoint that verifies. A
checkpoint taken in any layout (ep, dp, parallel.fsdp on or off) loads in any other (keys.py).
"""

from .errors import CheckpointError, CorruptCheckpointError
from .folder import checkpoint_candidates, latest_checkpoint
from .load import init_optimizer_state, load_checkpoint, load_latest_checkpoint, verify_checkpoint
from .save import PendingCheckpoint, save_checkpoint, save_checkpoint_async

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "PendingCheckpoint",
    "checkpoint_candidates",
    "init_optimizer_state",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
    "save_checkpoint_async",
    "verify_checkpoint",
]

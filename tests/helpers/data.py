"""Helpers of the data tests: read back what moe-train-prepare wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_train.data import open_source


def split_tokens(out: Path, split: str) -> np.ndarray:
    """Every token of a split of a prepared folder (its shards in order), int64."""
    source = open_source(out)
    stream = source.train if split == "train" else source.val
    return np.zeros(0, dtype=np.int64) if stream is None else stream.read(0, len(stream))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def folder_bytes(out: Path) -> dict[str, bytes]:
    """name -> bytes of every file of a prepared folder."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}

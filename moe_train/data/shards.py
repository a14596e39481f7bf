"""A sharded data folder, as `moe-train-prepare` writes it, and its manifest.

    OUT/manifest.json               what is here (below); written last, so its presence means
                                    every shard it lists is complete
    OUT/train-00000.bin, .idx       shard 0 of the training split: tokens + document index
    OUT/val-00000.bin, .idx         shard 0 of the validation split (same inputs as train-00000)
    OUT/tokenizer.json              when the tokenizer is not `bytes`

Every shard pair is a Megatron-LM indexed dataset (moe_train/data/megatron.py: `.bin` is the
flat token stream, uint16 or int32; `.idx` holds each document's length and start), so Megatron
reads these folders too. Each document is its tokens followed by the end-of-document token.

manifest.json (format version 1):

    {"format": "moe-train-shards", "version": 1,
     "tokenizer": "bytes" | "tokenizer.json", "tokenizer_sha256": null | "<hex>",
     "vocab_size": 256, "dtype": "uint16", "eot_id": 0,
     "splits": {"train": {"tokens": N, "documents": D, "max_token": M,
                          "shards": [{"name": "train-00000", "tokens": n, "documents": d,
                                      "max_token": m, "bin": {"bytes": b, "crc32": "1a2b3c4d"},
                                      "idx": {"bytes": b, "crc32": "..."}}, ...]},
                "val": {...}},
     "stats": {"records": ..., "empty": ..., "bad_json": ..., "bad_text": ..., ...},
     "settings": {"text_field": "text", "val_fraction": 0.05, ...}}

Opening a folder checks that every listed shard exists with its size, and (verify=True) its
CRC-32; a missing or damaged shard is a DataError naming it.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .megatron import IndexedTokens, bin_path, idx_path
from .streams import Segment, TokenStream
from .tokens import DataError, temp_name

MANIFEST = "manifest.json"
FORMAT = "moe-train-shards"
VERSION = 1
SPLITS = ("train", "val")
_CRC_CHUNK = 16 << 20
_CRC_THREADS = 4  # files checked at once (zlib releases the GIL)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes, 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON to `path` through a temporary name (never half-written)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "x") as f:
            f.write(json.dumps(payload, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_sharded(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest, with its structure checked (DataError naming what is wrong)."""
    path = Path(folder) / MANIFEST
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); re-create the folder with moe-train-prepare"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f'{path} is not a moe-train shard manifest (no "format": "{FORMAT}")')
    if meta.get("version") != VERSION:
        raise DataError(
            f"{path} has format version {meta.get('version')!r}; this moe-train reads version "
            f"{VERSION}: re-create the folder with this moe-train-prepare"
        )
    for key, kind in (("vocab_size", int), ("dtype", str), ("tokenizer", str), ("splits", dict)):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{path} needs `{key}` ({kind.__name__}), got {meta.get(key)!r}")
    for split in SPLITS:
        if not isinstance(meta["splits"].get(split, {}).get("shards"), list):
            raise DataError(f"{path}: splits.{split}.shards is missing")
    return meta


def verify_shards(folder: Path, meta: dict[str, Any], checksums: bool) -> None:
    """Every listed shard file is there with its size (and CRC-32 when `checksums`)."""
    entries = [
        (folder / f"{shard['name']}.{part}", shard[part])
        for split in SPLITS
        for shard in meta["splits"][split]["shards"]
        for part in ("bin", "idx")
    ]
    for path, want in entries:
        if not path.is_file():
            raise DataError(
                f"{folder}: {path.name} is listed in {MANIFEST} but missing; copy the whole "
                "folder again, or re-create it with moe-train-prepare"
            )
        if path.stat().st_size != want["bytes"]:
            raise DataError(
                f"{path}: {path.stat().st_size} bytes, but {MANIFEST} says {want['bytes']}: the "
                "file is truncated or was replaced; copy it again or re-run moe-train-prepare"
            )
    if not checksums:
        return
    with ThreadPoolExecutor(_CRC_THREADS) as pool:
        found = list(pool.map(lambda e: file_crc32(e[0]), entries))
    for (path, want), crc in zip(entries, found):
        if crc != want["crc32"]:
            raise DataError(
                f"{path}: CRC-32 {crc}, but {MANIFEST} says {want['crc32']}: the file is damaged; "
                "copy it again or re-run moe-train-prepare (data.verify_checksums=false skips "
                "this check)"
            )


def open_sharded(
    folder: str | os.PathLike[str], checksums: bool = True
) -> tuple[dict[str, Any], dict[str, TokenStream]]:
    """(manifest, {"train": stream, "val": stream}) of a sharded folder, verified."""
    folder = Path(folder)
    meta = read_manifest(folder)
    verify_shards(folder, meta, checksums)
    streams = {}
    for split in SPLITS:
        segments = []
        for shard in meta["splits"][split]["shards"]:
            if shard["tokens"] == 0:
                continue
            indexed = IndexedTokens(folder / shard["name"])
            if indexed.num_tokens != shard["tokens"]:
                raise DataError(
                    f"{bin_path(folder / shard['name'])}: {indexed.num_tokens} tokens, but "
                    f"{MANIFEST} says {shard['tokens']}; re-run moe-train-prepare"
                )
            segments.append(Segment(indexed.tokens, str(indexed.bin), indexed))
        streams[split] = TokenStream(segments, f"{folder} ({split})")
    return meta, streams


def shard_files(folder: Path, meta: dict[str, Any]) -> set[Path]:
    """Every file a manifest lists."""
    return {
        p(folder / shard["name"])
        for split in SPLITS
        for shard in meta["splits"][split]["shards"]
        for p in (bin_path, idx_path)
    }

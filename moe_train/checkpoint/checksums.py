"""Per-file checksums of a checkpoint folder: written after every file is complete and before the
folder is published, verified before anything is loaded from it.

    checksums.json   {"algorithm": "crc32", "files": {"__0_0.distcp": {"size": n, "crc32": "1a2b3c4d"}}}

CRC-32 (zlib, streamed in 16 MiB chunks) finds torn, truncated and bit-rotted files; it is not a
defence against tampering. The work is split over the ranks (sorted file i goes to rank
i % world, a few files at a time per rank: zlib releases the GIL), so a checkpoint of N ranks is
read back once in total, N ways in parallel; every rank learns the same verdict.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..parallel.objects import from_main, gather_all

if TYPE_CHECKING:
    from ..parallel import ParallelState

CHECKSUM_FILE = "checksums.json"
ALGORITHM = "crc32"
CHUNK = 16 << 20  # bytes read per call
THREADS = 4  # files hashed at once per rank


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, ALGORITHM: file_crc32(path)}


def _share(names: list[str], state: ParallelState | None) -> list[str]:
    if state is None or not state.dims.distributed:
        return names
    return names[state.dims.rank :: state.dims.world_size]


def _files(folder: Path) -> list[str]:
    """Every file under `folder` (relative posix paths), the checksum file left out."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(n for n in names if n != CHECKSUM_FILE)


def _map(fn, items: list[str]) -> list:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def write_checksums(folder: Path, state: ParallelState | None = None) -> None:
    """Hash every file of `folder` and write folder/checksums.json (rank 0, fsynced). Every rank
    calls it once all ranks' files are complete (after the save's last barrier)."""
    folder = Path(folder)
    names = from_main(state, lambda: _files(folder))
    mine = _share(names, state)
    parts = gather_all(state, dict(zip(mine, _map(lambda n: _entry(folder / n), mine))))
    if state is not None and not state.dims.is_main:
        return
    files = {name: entry for part in parts for name, entry in part.items()}
    text = json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}, indent=1)
    tmp = folder / f".{CHECKSUM_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / CHECKSUM_FILE)


def read_checksums(folder: Path) -> dict[str, dict[str, Any]] | str:
    """name -> {size, crc32} of folder/checksums.json, or what is wrong with it (a sentence)."""
    path = Path(folder) / CHECKSUM_FILE
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            return f"{path}: unknown checksum format"
        return files
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"


def _check(folder: Path, name: str, want: dict[str, Any]) -> str | None:
    path = folder / name
    try:
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size} bytes, {want['size']} were written (truncated or overwritten)"
        got = file_crc32(path)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as e:
        return f"{path} is unreadable ({e})"
    if got != want[ALGORITHM]:
        return f"{path}: checksum {got} does not match the saved {want[ALGORITHM]} (corrupted)"
    return None


def verify_checksums(folder: Path, state: ParallelState | None = None) -> list[str]:
    """What is wrong with the files of `folder` against its checksums.json: one sentence per bad
    file naming it; [] when every file verifies. Collective: every rank gets the same list."""
    folder = Path(folder)
    expected = from_main(state, lambda: read_checksums(folder))
    if isinstance(expected, str):
        return [expected]
    mine = _share(sorted(expected), state)
    problems = [p for p in _map(lambda n: _check(folder, n, expected[n]), mine) if p]
    return sorted(p for part in gather_all(state, problems) for p in part)


__all__ = ["CHECKSUM_FILE", "file_crc32", "read_checksums", "verify_checksums", "write_checksums"]

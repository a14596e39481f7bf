"""The embedded default corpus: this machine's Python standard library source, tokenized.

Real text, present wherever Python is, no download. Built on first use into
`<cache>/stdlib-py<X.Y>-<max_bytes>-v<N>/` (cache = `MOE_TRAIN_CACHE`, else
`~/.cache/moe_train/corpus`) and reused afterwards. The build writes a temporary folder and
renames it into place, so concurrent builders (e.g. every rank of a job) are safe: the first
rename wins, the others discard their copy and use the winner's.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from .prepare import Document, doc_hash, prepare_documents
from .tokens import temp_name

DEFAULT_MAX_BYTES = 8_000_000
CORPUS_VERSION = 1
VAL_FRACTION = 0.05
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FILES = ("train.bin", "train.json", "val.bin", "val.json")


def default_cache_dir() -> Path:
    """`$MOE_TRAIN_CACHE` if set, else `~/.cache/moe_train/corpus`."""
    env = os.environ.get("MOE_TRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe_train" / "corpus"


def stdlib_sources(max_bytes: int) -> list[Document]:
    """Standard-library .py files (no tests, no site-packages), in a fixed pseudo-random order
    (by hash of their relative path, for a mix of modules), each at most max_bytes / 20, taken
    while the total stays within `max_bytes`. Returned sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")
        )
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                found.append(Document(p.relative_to(root).as_posix(), p))
    found.sort(key=lambda d: (doc_hash(d.key), d.key))
    chosen, total = [], 0
    for d in found:
        size = d.path.stat().st_size
        if 0 < size <= max_bytes // 20 and total + size <= max_bytes:
            chosen.append(d)
            total += size
    return sorted(chosen, key=lambda d: d.key)


def _split(docs: list[Document]) -> list[bool]:
    """is_val: documents in hash order go to val while val stays within VAL_FRACTION of the
    bytes (at least one), so the val share is close to VAL_FRACTION even for a small corpus."""
    sizes = {d.key: d.path.stat().st_size for d in docs}
    budget = VAL_FRACTION * sum(sizes.values())
    val: set[str] = set()
    used = 0
    for key in sorted(sizes, key=lambda k: (doc_hash(k), k)):
        if not val or used + sizes[key] <= budget:
            val.add(key)
            used += sizes[key]
    return [d.key in val for d in docs]


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _FILES)


def default_corpus_dir(
    max_bytes: int = DEFAULT_MAX_BYTES,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Path:
    """Folder holding train/val token files of the default corpus, built if not cached."""
    if max_bytes <= 0:
        raise ValueError(f"default corpus max_bytes must be positive, got {max_bytes}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    v = sys.version_info
    final = root / f"stdlib-py{v.major}.{v.minor}-{max_bytes}-v{CORPUS_VERSION}"
    if _is_complete(final):
        return final
    docs = stdlib_sources(max_bytes)
    if len(docs) < 2:
        raise ValueError(
            f"default corpus: max_bytes={max_bytes} selects {len(docs)} standard-library files "
            f"from {sysconfig.get_paths()['stdlib']}; raise it (data.default_corpus_bytes) or "
            "prepare your own data with `moe-train-prepare`"
        )
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"moe-train: building the default corpus, once: {len(docs)} standard-library files "
        f"({sum(d.path.stat().st_size for d in docs) / 1e6:.1f} MB) -> byte tokens in {final}",
        file=sys.stderr,
        flush=True,
    )
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        prepare_documents(docs, tmp, VAL_FRACTION, progress=progress, is_val=_split(docs))
        (tmp / "SOURCES.txt").write_text("".join(f"{d.key}\n" for d in docs))
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # a stale, incomplete folder: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

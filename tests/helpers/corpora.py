"""Tiny corpora in every input format, written the way their own tools write them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def records(n: int, tag: str) -> list[dict]:
    """n records with a text field and some metadata (texts differ in length and content)."""
    return [
        {"id": f"{tag}-{i}", "text": f"{tag} record {i}: " + "lorem ipsum ünï " * (i % 5 + 1),
         "meta": {"lang": "en", "body": f"nested {tag} {i}"}}
        for i in range(n)
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict], compression: str | None = None) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression == "gzip":
        path.write_bytes(gzip.compress(text))
    elif compression == "zstd":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        path.write_bytes(text)
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def write_dataset(path: Path, rows: list[dict], splits: bool = False) -> Path:
    """A Hugging Face `datasets` folder (save_to_disk): a Dataset, or a DatasetDict of two."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(rows)
    if splits:
        half = len(rows) // 2
        ds = datasets.DatasetDict(
            {"train": ds.select(range(half)), "test": ds.select(range(half, len(rows)))}
        )
    ds.save_to_disk(str(path))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text"])
        w.writeheader()
        for r in rows:
            w.writerow({"id": r["id"], "text": r["text"]})
    return path


def mixed_corpus(root: Path) -> dict[str, list[str]]:
    """One folder holding every kind; returns the texts each file should yield, by file."""
    out: dict[str, list[str]] = {}
    for name, comp in (("a.jsonl", None), ("b.jsonl.gz", "gzip"), ("c.jsonl.zst", "zstd")):
        rows = records(30, name)
        write_jsonl(root / name, rows, comp)
        out[name] = [r["text"] for r in rows]
    rows = records(20, "arr")
    (root / "d.json").write_text(json.dumps(rows, indent=2))
    out["d.json"] = [r["text"] for r in rows]
    rows = records(45, "pq")
    write_parquet(root / "sub" / "e.parquet", rows, row_group_size=10)
    out["sub/e.parquet"] = [r["text"] for r in rows]
    rows = records(12, "hf")
    write_dataset(root / "hf", rows)
    out["hf"] = [r["text"] for r in rows]
    rows = records(8, "csv")
    write_csv(root / "f.csv", rows)
    out["f.csv"] = [r["text"] for r in rows]
    (root / "g.txt").write_text("a plain text document\n" * 10)
    out["g.txt"] = ["a plain text document\n" * 10]
    return out

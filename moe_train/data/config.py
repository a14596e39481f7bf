"""Data configuration (the `data` Hydra group) and where the token files come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..validation import at_least, check_finite
from .default_corpus import DEFAULT_MAX_BYTES, default_corpus_dir
from .tokens import DataError, TokenFile


@dataclass
class DataConfig:
    """dir: folder with train.bin/val.bin (+ .json sidecars) from `moe-train-prepare`;
        None = the embedded default corpus (the Python standard library's source, built once).
    default_corpus_bytes: size cap of the default corpus (bytes of source text).
    cache_dir: where the default corpus is cached; None = $MOE_TRAIN_CACHE or
        ~/.cache/moe_train/corpus.
    """

    dir: str | None = None
    default_corpus_bytes: int = DEFAULT_MAX_BYTES
    cache_dir: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field (`data.<field>`)."""
        check_finite(self, "data")
        for name in ("dir", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ValueError(f"data.{name}: must be a folder path or null, got ''")
        at_least(self, "data", 10_000, "default_corpus_bytes")


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The folder holding train.bin/val.bin: `cfg.dir`, or the default corpus (built if needed)."""
    cfg.validate()
    if cfg.dir is None:
        return default_corpus_dir(cfg.default_corpus_bytes, cfg.cache_dir)
    path = Path(cfg.dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data.dir={cfg.dir!r}: folder not found; create it with "
            f"`moe-train-prepare YOUR_TEXT --out {cfg.dir}`, or leave data.dir unset to use "
            "the embedded default corpus"
        )
    for name in ("train.bin", "val.bin"):
        if not (path / name).is_file():
            raise DataError(
                f"data.dir={cfg.dir!r}: {path / name} not found; the folder must hold train.bin "
                f"and val.bin from `moe-train-prepare YOUR_TEXT --out {cfg.dir}`"
            )
    return path


def open_splits(data_dir: str | Path, vocab_size: int | None = None) -> tuple[TokenFile, TokenFile]:
    """(train, val) token files of a data folder, validated and with matching vocabularies.
    `vocab_size` opens a nanoGPT folder (raw uint16 files without sidecars)."""
    d = Path(data_dir)
    train, val = TokenFile(d / "train.bin", vocab_size), TokenFile(d / "val.bin", vocab_size)
    if (train.vocab_size, train.tokenizer) != (val.vocab_size, val.tokenizer):
        raise DataError(
            f"{d}: train.bin (vocab {train.vocab_size}, {train.tokenizer}) and val.bin "
            f"(vocab {val.vocab_size}, {val.tokenizer}) disagree; re-run moe-train-prepare"
        )
    return train, val

"""Data configuration (the `data` Hydra group) and the training data it names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import at_least, check_finite, in_range, one_of
from .default_corpus import DEFAULT_MAX_BYTES, default_corpus_dir
from .mixture import check_weights
from .sampler import SAMPLINGS, BatchSampler
from .sources import Source, check_same_tokenizer, open_source, source_kind
from .streams import TokenStream
from .tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from .tokens import DataError


@dataclass
class MixSource:
    """One source of data.mix. path: a data folder, a Megatron prefix or folder (as data.dir);
    weight: its share of every batch (normalised over the sources); name: in metrics
    (val_loss/<name>), default the folder or prefix name."""

    path: str = ""  # a data folder, a Megatron prefix or a folder of Megatron files
    weight: float = 1.0  # share of every global batch, normalised over the sources; > 0
    name: str | None = None  # the source's name in metrics (val_loss/<name>); null = its folder


@dataclass
class DataConfig:
    """dir: a data folder from `moe-train-prepare` (manifest.json + shards, or train.bin/val.bin
        with .json sidecars; nanoGPT's raw files with model.vocab_size), a Megatron-LM dataset
        prefix (path/NAME of NAME.bin + NAME.idx) or a folder of them; None = the embedded
        default corpus (the Python standard library's source, built once).
    mix: sources, each {path (as dir), weight (> 0; normalised), name (in metrics:
        val_loss/<name>; default its folder name)}, e.g. [{path: data/web, weight: 3},
        {path: data/code, weight: 1}]; every step takes each source's share of the global batch
        (largest remainder); replaces dir.
    sampling: windows (random window starts, with replacement) | epoch (every non-overlapping
        window once per epoch, in a new shuffled order each epoch).
    document_mask: attention stays inside each document of a window (a block-diagonal causal
        mask) and positions restart at 0 at every document start; needs the document index
        moe-train-prepare writes (or an end-of-document token).
    holdout: share of a Megatron source's documents (its last ones) held out for validation;
        0 = no validation of that source.
    verify_checksums: check every shard's CRC-32 against manifest.json at start (one read of the
        data); false checks only that each shard is there with its size.
    default_corpus_bytes: size cap of the default corpus (bytes of source text).
    cache_dir: where the default corpus is cached; None = $MOE_TRAIN_CACHE or
        ~/.cache/moe_train/corpus.
    """

    dir: str | None = None
    mix: list[MixSource] = field(default_factory=list)
    sampling: str = "windows"
    document_mask: bool = False
    holdout: float = 0.01
    verify_checksums: bool = True
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
        one_of(self, "data", "sampling", SAMPLINGS)
        in_range(self, "data", 0.0, 1.0, "holdout")
        if self.mix and self.dir is not None:
            raise ValueError(
                "data.mix and data.dir are both set; give the sources in data.mix only (a "
                "one-source mix is data.dir)"
            )
        for i, s in enumerate(self.mix):
            if not str(s.path).strip():
                raise ValueError(f"data.mix[{i}].path: must be a data path, got {s.path!r}")
            w = s.weight
            if (
                isinstance(w, bool)
                or not isinstance(w, int | float)
                or not math.isfinite(w)
                or w <= 0
            ):
                raise ValueError(
                    f"data.mix[{i}].weight: must be a positive, finite number, got {w!r}"
                )


@dataclass
class TrainingData:
    """The sources training reads, their weights and how windows are drawn from them."""

    sources: list[Source]
    weights: list[float]
    sampling: str = "windows"
    document_mask: bool = False  # batches carry document positions (data.document_mask)
    _samplers: dict = field(default_factory=dict, repr=False)

    @property
    def first(self) -> Source:
        return self.sources[0]

    @property
    def vocab_size(self) -> int:
        return self.first.vocab_size

    @property
    def path(self) -> Path:
        return self.first.path

    @property
    def is_mixture(self) -> bool:
        return len(self.sources) > 1

    def sampler(self, seed: int, global_batch: int, seq_len: int) -> BatchSampler:
        """The batches of every step (one object per (seed, batch, seq_len))."""
        key = (seed, global_batch, seq_len)
        if key not in self._samplers:
            self._samplers[key] = BatchSampler(
                [s.train for s in self.sources], self.weights, seed, global_batch, seq_len,
                self.sampling,
            )  # fmt: skip
        return self._samplers[key]

    def validation(self) -> list[tuple[str, float, TokenStream]]:
        """(name, normalised weight, val stream) of every source that has validation data."""
        total = sum(self.weights)
        return [(s.name, w / total, s.val) for s, w in zip(self.sources, self.weights) if s.val]

    def describe(self, global_batch: int, seq_len: int) -> str:
        """One line for the start message."""
        sampler = self.sampler(0, global_batch, seq_len)
        how = self.sampling
        if self.sampling == "epoch":
            how += f" ({sampler.epoch_steps(0):,.1f} steps per epoch of {self.first.name})"
        how += ", document mask" if self.document_mask else ""
        if not self.is_mixture:
            return f"data {self.first.path} ({how})"
        names = [s.name for s in self.sources]
        return f"data mix {sampler.mixture.describe(names)} ({how})"


def resolve_data_dir(cfg: DataConfig) -> Path:
    """The data path of a one-source config: `cfg.dir`, or the default corpus (built if needed).
    (A mixture has several: see open_data.)"""
    cfg.validate()
    if cfg.dir is None:
        return default_corpus_dir(cfg.default_corpus_bytes, cfg.cache_dir)
    source_kind(cfg.dir, "data.dir")
    return Path(cfg.dir).expanduser()


def open_data(cfg: DataConfig, vocab_size: int | None = None) -> TrainingData:
    """The sources cfg names, opened and checked: names unique, one tokenizer and vocabulary."""
    cfg.validate()
    if cfg.mix:
        entries = [(s.path, s.weight, s.name) for s in cfg.mix]
        labels = [f"data.mix[{i}].path" for i in range(len(cfg.mix))]
    else:
        entries, labels = [(str(resolve_data_dir(cfg)), 1.0, None)], ["data.dir"]
    sources = [
        open_source(path, vocab_size, cfg.holdout, cfg.verify_checksums, name, label)
        for (path, _, name), label in zip(entries, labels)
    ]
    names = [s.name for s in sources]
    check_weights([w for _, w, _ in entries], names)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(
            f"data.mix: two sources are named {dup[0]!r}; give them names: "
            "[{path: ..., name: web}, {path: ..., name: code}]"
        )
    check_same_tokenizer(sources)
    if cfg.document_mask:
        check_document_index(sources)
    return TrainingData(sources, [float(w) for _, w, _ in entries], cfg.sampling, cfg.document_mask)


def check_document_index(sources: list[Source]) -> None:
    """data.document_mask needs every split's document starts; else a DataError naming the
    source and the fix."""
    for s in sources:
        for split in (s.train, s.val):
            if split is not None and not split.knows_documents:
                raise DataError(
                    f"data.document_mask=true: {s.name!r} ({s.path}, {s.kind}) has no document "
                    "index and no known end-of-document token, so its document boundaries are "
                    "unknown; re-run moe-train-prepare on its corpus (it writes a document index "
                    "with every shard) or set data.document_mask=false"
                )


def data_tokenizer(cfg: DataConfig, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of the data cfg names (its first source; checksums not read)."""
    if not cfg.mix and cfg.dir is None:
        return ByteTokenizer()
    path = cfg.mix[0].path if cfg.mix else str(cfg.dir)
    source = open_source(path, vocab_size, cfg.holdout, checksums=False)
    if source.tokenizer == ByteTokenizer.name:
        return ByteTokenizer()
    return load_tokenizer(source.tokenizer_folder, source.tokenizer)

"""The embedded default corpus and DataConfig."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_train.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    default_corpus_dir,
    open_splits,
    resolve_data_dir,
)
from moe_train.data import default_corpus as dc

SMALL = 120_000


def test_builds_and_opens(tmp_path: Path) -> None:
    d = default_corpus_dir(SMALL, tmp_path)
    assert d.parent == tmp_path
    train, val = open_splits(d)
    assert 0 < len(val) < len(train) and len(train) + len(val) <= SMALL + 1000
    assert "def " in ByteTokenizer().decode(train.tokens[:20000])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cached_second_call_does_not_rebuild(tmp_path: Path, monkeypatch) -> None:
    d = default_corpus_dir(SMALL, tmp_path)
    mtime = (d / "train.bin").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(dc, "prepare_documents", boom)
    assert default_corpus_dir(SMALL, tmp_path) == d
    assert (d / "train.bin").stat().st_mtime_ns == mtime


def test_deterministic(tmp_path: Path) -> None:
    a = default_corpus_dir(SMALL, tmp_path / "a")
    b = default_corpus_dir(SMALL, tmp_path / "b")
    for name in ("train.bin", "val.bin", "train.json", "val.json", "SOURCES.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_env_cache_dir_and_concurrent_builds(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOE_TRAIN_CACHE", str(tmp_path / "env"))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_corpus_dir(SMALL))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].parent == tmp_path / "env"
    open_splits(results[0])
    assert len(list((tmp_path / "env").iterdir())) == 1  # losers cleaned up


def test_config_validate_names_field() -> None:
    with pytest.raises(ValueError, match="data.default_corpus_bytes"):
        DataConfig(default_corpus_bytes=5).validate()
    with pytest.raises(ValueError, match="data.dir"):
        DataConfig(dir="").validate()
    with pytest.raises(ValueError, match="data.cache_dir"):
        DataConfig(cache_dir=" ").validate()
    DataConfig().validate()


def test_config_is_structured() -> None:
    cfg = OmegaConf.structured(DataConfig)
    cfg.dir = "some/where"
    assert OmegaConf.to_object(cfg) == DataConfig(dir="some/where")


def test_resolve_data_dir(tmp_path: Path) -> None:
    d = resolve_data_dir(DataConfig(default_corpus_bytes=SMALL, cache_dir=str(tmp_path)))
    assert d == default_corpus_dir(SMALL, tmp_path)
    assert resolve_data_dir(DataConfig(dir=str(d))) == d
    with pytest.raises(DataError, match="data.dir.*moe-train-prepare"):
        resolve_data_dir(DataConfig(dir=str(tmp_path / "missing")))
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="train.bin"):
        resolve_data_dir(DataConfig(dir=str(tmp_path / "half")))

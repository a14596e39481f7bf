"""Data checked before the first step: the vocabulary (model.vocab_size from the data), token ids
out of it, too small a split, nanoGPT folders; and a BPE data folder end to end (prepare, train,
generate, eval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_train.data import DataError, prepare_corpus, write_tokens
from moe_train.inference.run import load_run_config
from moe_train.metrics import read_metrics
from moe_train.train import train
from tests.helpers.runs import cli, compose_cfg

TINY = ["model=tiny", "trainer=ci", "trainer.eval_batches=1", "trainer.global_batch_size=4"]


def run_cfg(run_dir: Path, data_dir: Path, *extra: str):
    return compose_cfg(*TINY, f"trainer.run_dir={run_dir}", f"data.dir={data_dir}", *extra)


def nanogpt_folder(root: Path, val_ids: np.ndarray | None = None) -> Path:
    """train.bin / val.bin of raw uint16, no sidecars (nanoGPT's prepare.py output)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 5000).astype(np.uint16).tofile(root / "train.bin")
    ids = rng.integers(0, 300, 1000) if val_ids is None else val_ids
    ids.astype(np.uint16).tofile(root / "val.bin")
    return root


def assert_nothing_ran(run_dir: Path) -> None:
    assert not list(run_dir.glob("step_*")) and not (run_dir / "metrics.jsonl").exists()


def test_a_nanogpt_folder_trains_when_the_vocabulary_is_given(tmp_path, capsys):
    data = nanogpt_folder(tmp_path / "nano")
    summary = train(run_cfg(tmp_path / "run", data, "model.vocab_size=320", "trainer.max_steps=2"))
    assert summary["steps"] == 2 and summary["seconds"] > 0
    out = capsys.readouterr().out
    assert "config:\n  model    vocab_size=320 seq_len=64" in out  # printed at start
    assert "done: 2 steps in " in out
    with pytest.raises(DataError, match="model.vocab_size"):
        train(run_cfg(tmp_path / "run2", data, "trainer.max_steps=2"))


def test_an_out_of_vocabulary_id_names_the_file_and_both_numbers(tmp_path):
    val = np.arange(1000) % 300
    val[777] = 400  # only a full scan finds it: sampled blocks would miss it in a big file
    data = nanogpt_folder(tmp_path / "nano", val)
    with pytest.raises(DataError) as e:
        train(run_cfg(tmp_path / "run", data, "model.vocab_size=320"))
    msg = str(e.value)
    assert str(data / "val.bin") in msg and "400" in msg and "320" in msg
    assert_nothing_ran(tmp_path / "run")


def test_too_small_a_validation_split_fails_before_the_first_step(tmp_path):
    data = tmp_path / "data"
    write_tokens(data / "train.bin", np.arange(5000) % 256, 256, "bytes")
    write_tokens(data / "val.bin", np.arange(50) % 256, 256, "bytes")
    with pytest.raises(DataError) as e:
        train(run_cfg(tmp_path / "run", data))
    msg = str(e.value)
    assert str(data / "val.bin") in msg and "50 tokens" in msg and "--val-fraction" in msg
    assert_nothing_ran(tmp_path / "run")
    # without validation the same folder trains
    assert train(run_cfg(tmp_path / "run", data, "trainer.eval_batches=0", "trainer.max_steps=1"))


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    """A BPE of 512 entries trained on a slice of the standard library (real text)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(p) for p in sorted((stdlib / "json").glob("*.py"))]
    files += [str(p) for p in sorted((stdlib / "email").glob("*.py"))[:12]]
    out = tmp_path_factory.mktemp("bpe")
    prepare_corpus(files, out, val_fraction=0.2, progress=False, tokenizer="bpe", vocab_size=512)
    return out


def test_the_vocabulary_comes_from_the_data(tmp_path, bpe_data):
    data_vocab = json.loads((bpe_data / "manifest.json").read_text())["vocab_size"]
    train(run_cfg(tmp_path / "run", bpe_data, "trainer.max_steps=1"))
    saved = load_run_config(tmp_path / "run").model.vocab_size
    assert saved == -(-data_vocab // 64) * 64 and saved >= data_vocab
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # the run keeps its tokenizer
    with pytest.raises(DataError) as e:
        train(run_cfg(tmp_path / "small", bpe_data, "model.vocab_size=256"))
    assert "model.vocab_size=256" in str(e.value) and f"({data_vocab}," in str(e.value)


@pytest.mark.slow
def test_a_bpe_run_trains_generates_and_evaluates(tmp_path, bpe_data):
    run_dir = tmp_path / "run"
    extra = ("trainer.max_steps=30", "trainer.ckpt_every=30", "trainer.global_batch_size=8")
    train(run_cfg(run_dir, bpe_data, *extra))
    curve = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert curve[-1] < curve[0] - 0.5  # it learns (from about ln(512) = 6.2)
    p = cli(
        "inference.generate",
        str(run_dir),
        "--prompt",
        "import ",
        "--max-new-tokens",
        "30",
        "--no-stop",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() and "\ufffd" not in p.stdout  # whole UTF-8 characters
    r = json.loads(cli("inference.evaluate", str(run_dir), "--batches", "2", "--json").stdout)
    assert r["bytes"] > 1.5 * r["tokens"]  # a BPE token stands for several bytes
    assert r["bits_per_byte"] < r["bits_per_token"] / 1.5

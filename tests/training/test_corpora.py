"""Real corpora end to end: a JSONL + Parquet corpus prepared and trained on; a mixture whose
metrics and moe-train-eval give each source's validation loss; epoch sampling resumed at an
epoch boundary; a Megatron dataset trained on in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moe_train.data import IndexedWriter, prepare_corpus
from moe_train.metrics import read_metrics
from moe_train.train import train
from tests.helpers.runs import cli, compose_cfg

TINY = ["model=tiny", "trainer=ci", "trainer.eval_batches=1", "trainer.global_batch_size=4"]


def write_corpus(root: Path, tag: str, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    rows = [{"text": f"{tag} {i}: " + " ".join(f"{tag}{(i * j) % 17}" for j in range(30))}
            for i in range(n)]  # fmt: skip
    with open(root / "part-0.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[: n // 2])
    pq.write_table(pa.Table.from_pylist(rows[n // 2 :]), root / "part-1.parquet", row_group_size=50)
    return root


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for tag, n in (("web", 300), ("code", 200)):
        write_corpus(root / f"{tag}_raw", tag, n)
        prepare_corpus([str(root / f"{tag}_raw")], root / tag, val_fraction=0.1, progress=False)
        out[tag] = root / tag
    return out


def records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def test_a_prepared_jsonl_and_parquet_corpus_trains(tmp_path, corpora):
    summary = train(compose_cfg(*TINY, f"trainer.run_dir={tmp_path / 'run'}",
                                f"data.dir={corpora['web']}", "trainer.max_steps=3"))  # fmt: skip
    assert summary["steps"] == 3
    assert any("val_loss" in r for r in records(tmp_path / "run"))


def mix(corpora, *extra: str) -> list[str]:
    return [f"data.mix=[{{path:{corpora['web']},weight:3}},{{path:{corpora['code']},weight:1}}]",
            *extra]  # fmt: skip


@pytest.mark.slow  # moe-train-eval in a process of its own
def test_a_mixture_logs_and_evaluates_each_source(tmp_path, corpora, capsys):
    run_dir = tmp_path / "run"
    train(compose_cfg(*TINY, f"trainer.run_dir={run_dir}", "trainer.max_steps=4",
                      "trainer.eval_every=4", *mix(corpora)))  # fmt: skip
    assert "data mix web 3/4 (quota 3), code 1/4 (quota 1)" in capsys.readouterr().out
    val = [r for r in records(run_dir) if "val_loss" in r][-1]
    assert val["val_loss"] == pytest.approx(
        0.75 * val["val_loss/web"] + 0.25 * val["val_loss/code"]
    )
    p = cli("inference.evaluate", str(run_dir), "--batches", "1", "--batch-size", "4", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert set(r["sources"]) == {"web", "code"} and r["weights"] == [0.75, 0.25]
    for name in ("web", "code"):  # the same windows as training validates on
        assert r["sources"][name]["loss"] == pytest.approx(val[f"val_loss/{name}"], rel=1e-4)
    assert r["loss"] == pytest.approx(val["val_loss"], rel=1e-4)
    text = cli("inference.evaluate", str(run_dir), "--batches", "1", "--batch-size", "4").stdout
    assert text.count(" on ") == 2 and "mixture (web 0.75, code 0.25): loss" in text


@pytest.mark.slow
def test_epoch_sampling_resumes_at_an_epoch_boundary(tmp_path, corpora):
    """The torchtitan #3008 class of bug: the run restarted at an epoch's end must read the next
    epoch's batches, not the first epoch's again. `small` gives 1 of 4 rows per step and has 5
    windows: an epoch every 5 steps."""
    from moe_train.data import write_tokens

    small = tmp_path / "small"
    rng = np.random.default_rng(1)
    write_tokens(small / "train.bin", rng.integers(1, 256, 5 * 64 + 1 + 9), 256, "bytes")
    write_tokens(small / "val.bin", rng.integers(1, 256, 300), 256, "bytes")
    overrides = [*TINY, "trainer.max_steps=12", "trainer.eval_batches=0", "data.sampling=epoch",
                 "trainer.keep_checkpoints=3",
                 f"data.mix=[{{path:{corpora['web']},weight:3}},{{path:{small},weight:1}}]"]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(compose_cfg(*overrides, f"trainer.run_dir={full}", "trainer.ckpt_every=5"))
    resumed.mkdir()
    shutil.copytree(full / "step_00000005", resumed / "step_00000005")
    (resumed / "latest").write_text("step_00000005\n")
    train(compose_cfg(*overrides, f"trainer.run_dir={resumed}", "trainer.ckpt_every=5"))
    a = {r["step"]: r["loss"] for r in records(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in records(resumed) if "loss" in r}
    assert sorted(b) == list(range(6, 13))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


def test_a_megatron_dataset_trains_in_place(tmp_path):
    rng = np.random.default_rng(0)
    with IndexedWriter(tmp_path / "mg" / "corpus_text_document", np.dtype("uint16")) as w:
        for _ in range(60):
            w.add(rng.integers(1, 250, rng.integers(20, 80)))
            w.end_document()
    prefix = tmp_path / "mg" / "corpus_text_document"
    summary = train(compose_cfg(*TINY, f"trainer.run_dir={tmp_path / 'run'}", f"data.dir={prefix}",
                                "model.vocab_size=256", "data.holdout=0.2", "trainer.max_steps=2"))  # fmt: skip
    assert summary["steps"] == 2 and summary["best_val_loss"] == summary["best_val_loss"]

"""moe-train-prepare with --tokenizer bpe|PATH: a byte-level BPE trained offline, saved as
tokenizer.json, round trips the text; an existing tokenizer.json is reused; bytes per token are
exact; skipped binaries are one line; the manifest records the largest id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_train.data import DataError
from moe_train.data.prepare import main as prepare_main
from moe_train.data.prepare import prepare_corpus, skipped_line
from moe_train.data.tokenizers import HFTokenizer, load_tokenizer, train_bpe
from tests.helpers.data import manifest, split_tokens

TEXTS = {
    f"doc{i}.txt": (
        f"def function_{i}(x, y):\n    return x * {i} + y  # ünïcödé ∑ {i}\n\n" * (20 + i)
        + "The quick brown fox jumps over the lazy dog. " * 10
    )
    for i in range(12)
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text)
    return root


def docs_of(out: Path, split: str) -> list[str]:
    tok = load_tokenizer(out, manifest(out)["tokenizer"])
    ids = split_tokens(out, split)
    assert ids[-1] == tok.eot_id
    parts = np.split(ids, np.flatnonzero(ids == tok.eot_id) + 1)[:-1]
    return [tok.decode(p, skip_eot=True) for p in parts]


def test_bpe_prepare_round_trips_and_saves_its_tokenizer(corpus, tmp_path):
    out = tmp_path / "bpe"
    r = prepare_corpus([str(corpus)], out, progress=False, tokenizer="bpe", vocab_size=512)
    assert (out / "tokenizer.json").is_file()
    meta = manifest(out)
    assert meta["tokenizer"] == "tokenizer.json" and meta["vocab_size"] == r.vocab_size <= 512
    top = meta["splits"]["train"]["max_token"]
    assert top == int(split_tokens(out, "train").max()) < meta["vocab_size"]
    assert set(docs_of(out, "train")) | set(docs_of(out, "val")) == set(TEXTS.values())
    assert r.train_tokens < sum(len(t.encode()) for t in TEXTS.values()) / 2  # it compresses


def test_an_existing_tokenizer_json_is_reused(corpus, tmp_path):
    prepare_corpus([str(corpus)], tmp_path / "a", progress=False, tokenizer="bpe", vocab_size=400)
    source = tmp_path / "a" / "tokenizer.json"
    prepare_corpus([str(corpus)], tmp_path / "b", progress=False, tokenizer=str(source))
    prepare_corpus([str(corpus)], tmp_path / "c", progress=False, tokenizer=str(tmp_path / "a"))
    a, b, c = (split_tokens(tmp_path / x, "val") for x in "abc")
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert (tmp_path / "b" / "tokenizer.json").is_file()


def test_token_bytes_count_the_utf8_bytes(corpus):
    tok = train_bpe(TEXTS.values(), 400)
    text = TEXTS["doc3.txt"]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    assert tok.token_bytes()[tok.eot_id] == 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tokenizer": "bpe", "vocab_size": 100}, "257"),
        ({"tokenizer": "bytes", "vocab_size": 512}, "--vocab-size"),
        ({"tokenizer": "nowhere/tokenizer.json"}, "not found"),
    ],
)
def test_tokenizer_errors_say_what_to_do(corpus, tmp_path, kwargs, words):
    with pytest.raises(DataError, match=words):
        prepare_corpus([str(corpus)], tmp_path / "out", progress=False, **kwargs)


def test_a_tokenizer_without_an_end_of_text_token_is_refused(tmp_path):
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.train_from_iterator(["a b c"], tokenizers.trainers.BpeTrainer(vocab_size=30))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="end-of-text"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json")


def test_skipped_binaries_are_one_line(corpus, tmp_path, capsys):
    for i in range(5):
        (corpus / f"blob{i}.bin").write_bytes(b"\x00\x01" * 100)
    assert prepare_main([str(corpus), "--out", str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(err) == 1 and err[0].startswith("skipped 5 binary files: ") and "2 more" in err[0]
    assert skipped_line([Path("a")]) == "skipped 1 binary file: a"


def test_prepare_cli_trains_a_bpe(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "300"]
    assert prepare_main([*args, "--quiet"]) == 0
    assert load_tokenizer(out, "tokenizer.json").vocab_size <= 300


def test_a_run_folder_keeps_its_datas_tokenizer(corpus, tmp_path):
    from moe_train.data.tokenizers import copy_tokenizer_files

    prepare_corpus([str(corpus)], tmp_path / "bpe", progress=False, tokenizer="bpe", vocab_size=300)
    run = tmp_path / "run"
    assert copy_tokenizer_files(tmp_path / "bpe", "tokenizer.json", run) == [run / "tokenizer.json"]
    assert load_tokenizer(run, "tokenizer.json").vocab_size <= 300
    assert copy_tokenizer_files(tmp_path / "bytes", "bytes", run) == []  # a later byte run
    assert not (run / "tokenizer.json").exists()  # does not inherit the stale BPE

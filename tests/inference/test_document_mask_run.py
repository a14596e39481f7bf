"""A `moe-train` run with data.document_mask=true trains, and its model generates and is scored
as any other (inference runs without a mask)."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from tests.helpers.runs import cli, losses, tiny_overrides

# the modules (a package attribute of the same name may be a function)
generate_cli = importlib.import_module("moe_train.inference.generate")
evaluate_cli = importlib.import_module("moe_train.inference.evaluate")


@pytest.mark.slow
def test_a_document_masked_run_trains_then_generates_and_evaluates(tmp_path, corpus_cache, capsys):
    run_dir = tmp_path / "masked"
    extra = ("data.document_mask=true", "trainer.eval_every=30", "trainer.ckpt_every=30")
    p = cli("train", *tiny_overrides(run_dir, corpus_cache, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "document mask" in p.stdout
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 31))
    assert curve[30] < curve[1] - 1.0  # bytes start near ln(256) = 5.5

    args = [str(run_dir), "--prompt", "def ", "--max-new-tokens", "16", "--no-stop"]
    assert generate_cli.main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "16 tokens" in out.err and "KV cache" in out.err
    assert evaluate_cli.main([str(run_dir), "--batches", "2", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["step"] == 30 and math.isfinite(scored["loss"])

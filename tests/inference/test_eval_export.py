"""`moe-train-eval` (loss, perplexity, bits per byte, expert load) and `moe-train-export` (one
safetensors file that `from_pretrained` loads to the checkpoint's logits), also for a run trained
at ep=2 on 2 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moe_train import MoETransformer, from_pretrained
from moe_train.data import open_splits, val_batches
from moe_train.inference import load_pretrained_tokenizer
from moe_train.inference.evaluate import score
from moe_train.inference.run import load_run
from tests.helpers.runs import cli, tiny_overrides

pytestmark = pytest.mark.slow  # every test reads a 30-step run (tiny_run) or runs a tool


def test_score_is_the_mean_cross_entropy(tiny_run):
    run = load_run(tiny_run)
    _, val = open_splits(_data_dir(run), run.cfg.model.vocab_size)
    r = score(run.model, val, run.tokenizer.token_bytes(), batch_size=4, max_batches=3)
    with torch.no_grad():
        losses = [
            F.cross_entropy(run.model(x)[0].flatten(0, 1), y.flatten(), reduction="sum")
            for x, y in val_batches(val, run.cfg.model.seq_len, 4, 3)
        ]
    tokens = 3 * 4 * run.cfg.model.seq_len
    assert r["tokens"] == tokens and r["bytes"] == tokens  # bytes: one per token
    assert r["loss"] == pytest.approx(float(sum(losses)) / tokens, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2))
    assert len(r["moe_layers"]) == len(run.model.moe_layers())
    for layer in r["moe_layers"]:
        assert sum(layer["expert_share"]) == pytest.approx(1.0, abs=1e-4)
        assert 0 <= layer["dropped_frac"] < 1 and layer["load_cv"] >= 0


def _data_dir(run) -> Path:
    from moe_train.data import resolve_data_dir

    return resolve_data_dir(run.cfg.data)


def test_eval_cli_prints_the_three_keys(tiny_run):
    p = cli("inference.evaluate", str(tiny_run), "--batches", "2", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert {"loss", "perplexity", "bits_per_byte"} <= set(r)
    assert 0 < r["loss"] < math.log(256) and r["step"] == 30
    text = cli("inference.evaluate", str(tiny_run), "--batches", "2", "--split", "train")
    assert text.returncode == 0 and "bits/byte" in text.stdout and "MoE layer 1" in text.stdout


def test_the_tools_load_the_checkpoint_they_are_given(tiny_run):
    p = cli("inference.evaluate", str(tiny_run), "--batches", "1", "--json", "--checkpoint",
            str(tiny_run / "step_00000020"))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["step"] == 20  # not the newest (30)
    missing = tiny_run / "step_00000005"
    p = cli("inference.generate", str(tiny_run), "--prompt", "x", "--checkpoint", str(missing))
    assert p.returncode == 2 and str(missing) in p.stderr and "no such directory" in p.stderr


def test_eval_cli_names_a_too_small_split(tiny_run, tmp_path):
    from moe_train.data import write_tokens

    write_tokens(tmp_path / "train.bin", torch.arange(500) % 256, 256, "bytes")
    write_tokens(tmp_path / "val.bin", torch.arange(20) % 256, 256, "bytes")
    p = cli("inference.evaluate", str(tiny_run), "--data", str(tmp_path))
    assert p.returncode == 2 and "val.bin" in p.stderr and "20 tokens" in p.stderr


def export_and_compare(run_dir: Path, out: Path) -> MoETransformer:
    p = cli("inference.export", str(run_dir), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    run = load_run(run_dir)  # the checkpoint, through DCP
    exported = from_pretrained(out)  # the export, through safetensors
    idx = torch.randint(0, 256, (2, run.cfg.model.seq_len))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], run.model(idx)[0])
    return exported


def test_export_loads_with_the_checkpoints_logits(tiny_run, tmp_path):
    model = export_and_compare(tiny_run, tmp_path / "export")
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "head.weight" not in tensors  # tied to tok_emb.weight
    assert tensors["blocks.0.ffn.experts.w_in"].shape == (4, 64, 2 * 96)  # [E, d, 2f], all experts
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model"]["vocab_size"] == 256 and config["router"]["kind"] == "switch"
    assert config["tokenizer"] == {"type": "bytes", "vocab_size": 256, "eot_id": 0}
    assert load_pretrained_tokenizer(tmp_path / "export").decode([104, 105]) == "hi"
    assert not model.training


@pytest.mark.distributed
def test_export_of_a_two_rank_ep2_run(tmp_path, corpus_cache):
    run_dir = tmp_path / "ep2"
    args = tiny_overrides(
        run_dir, corpus_cache, "trainer.max_steps=6", "trainer.eval_batches=0", "parallel.ep=2"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "moe_train.train", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    model = export_and_compare(run_dir, tmp_path / "export")
    # the file holds every expert trained on either rank, in global order: rank 1's experts
    # (2 and 3) were trained there, so they differ from the same seed's initial values
    init = MoETransformer(model.cfg, model.router_cfg, seed=1337)
    w, w0 = model.blocks[0].ffn.experts.w_in, init.blocks[0].ffn.experts.w_in
    for e in range(4):
        assert not torch.equal(w[e], w0[e]), f"expert {e} was not trained"

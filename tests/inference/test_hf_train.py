"""`moe-train model.init_from=DIR` end to end: a Hugging Face folder imported on 2 gloo ranks
(ep=2, FSDP on), trained 3 steps, checkpointed and exported holds exactly the folder's tensors
(the learning rate is too small to move a float32 weight), and computes transformers' logits.
(Export from a 1-process run: test_hf_export; layout invariance of training: tests/training.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.inference.hf_cases import max_rel
from tests.inference.test_hf_import import hf_model

transformers = pytest.importorskip("transformers")


def _train(tmp_path, run_dir, nproc, *overrides):
    args = [
        "-m", "moe_train.train", "model=tiny", "trainer=ci", "trainer.max_steps=3",
        "trainer.eval_batches=0", "trainer.ckpt_every=3", f"trainer.run_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'corpus'}", "data.default_corpus_bytes=200000", *overrides,
    ]  # fmt: skip
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_import_on_two_ranks_with_fsdp_then_train_and_export(tmp_path):
    from safetensors.torch import load_file

    from moe_train.inference.export import main as export_main
    from moe_train.inference.run import load_run

    hf = hf_model("mixtral")
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    source = load_file(str(folder / "model.safetensors"))

    # ep=2 x FSDP on 2 ranks, a learning rate too small to move a float32 weight: the checkpoint
    # after 3 steps is the import itself, and its export is the folder, tensor by tensor
    frozen = tmp_path / "frozen"
    init = [f"model.init_from={folder}", "optim.lr=1e-30", "optim.warmup_steps=1"]
    _train(tmp_path, frozen, 2, *init, "parallel.ep=2", "parallel.fsdp=true")
    assert export_main([str(frozen), "--out", str(tmp_path / "back"), "--format", "hf"]) == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(source)
    for name, value in source.items():
        assert torch.equal(back[name], value), name

    # the run (trained, checkpointed, exported like any run) computes what transformers computes
    run = load_run(frozen)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", dtype=torch.float32
    ).eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_rel(loaded(idx).logits, run.model(idx)[0]) < 1e-5
        assert max_rel(hf(idx).logits, run.model(idx)[0]) < 1e-5

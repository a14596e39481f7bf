"""trainer.engine=deepspeed: trains on 2 gloo ranks and matches the native engine's loss curve."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_train.metrics import read_metrics

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"
    ),
]


def torchrun(tmp_path: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        # the session's build cache when it has one (CI's: DeepSpeed's CPU op is built once)
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
        or str(tmp_path.parent / "torch_ext"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "moe_train.train", "model=tiny", "trainer=ci", "trainer.max_steps=6",
        "trainer.eval_every=100", "trainer.ckpt_every=3", f"trainer.run_dir={run_dir}",
        f"data.cache_dir={tmp_path.parent / 'corpus'}", "data.default_corpus_bytes=400000", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_deepspeed_matches_native_on_two_ranks(tmp_path):
    for engine in ("native", "deepspeed"):
        p = torchrun(
            tmp_path, tmp_path / engine, f"trainer.engine={engine}", "trainer.zero_stage=1"
        )
        assert p.returncode == 0, p.stderr[-3000:]
    native, ds = losses(tmp_path / "native"), losses(tmp_path / "deepspeed")
    assert len(native) == len(ds) == 6
    assert ds == pytest.approx(native, rel=1e-4)
    assert (tmp_path / "deepspeed" / "latest").read_text().strip() == "step_00000006"  # DCP


def _initialize(optimizer_name: str, zero_stage: int, ep: int):
    import torch

    from moe_train.engines import deepspeed_initialize
    from moe_train.parallel import ParallelConfig, ParallelDims, ParallelState
    from moe_train.training.adafactor import Adafactor

    model = torch.nn.Linear(2, 2)
    if optimizer_name == "adafactor":
        opt = Adafactor(model.parameters())
    else:
        opt = torch.optim.AdamW(model.parameters())
    parallel = ParallelState(ParallelConfig(ep=ep), ParallelDims(world_size=2, ep=ep))
    return deepspeed_initialize(
        model, opt, parallel, num_experts=2, micro_batch=1, grad_accum=1,
        zero_stage=zero_stage, grad_clip=1.0, amp_dtype=None,
    )  # fmt: skip


def test_deepspeed_ep_without_zero_is_refused_by_name():
    with pytest.raises(ValueError, match="trainer.zero_stage=0 with parallel.ep=2"):
        _initialize("adamw", zero_stage=0, ep=2)


def test_deepspeed_zero_with_adafactor_is_refused_by_name():
    with pytest.raises(ValueError, match="optim.name=adafactor with trainer.engine=deepspeed"):
        _initialize("adafactor", zero_stage=1, ep=1)


def test_deepspeed_before_the_expert_gradient_fix_is_refused_with_ep(monkeypatch):
    import deepspeed

    from moe_train.engines.deepspeed_moe import check_version

    check_version(2)  # the installed one is supported
    monkeypatch.setattr(deepspeed, "__version_minor__", 14)
    check_version(1)  # data parallel only: expert gradients are reduced like dense ones
    with pytest.raises(ValueError, match="needs DeepSpeed >= 0.16.0"):
        check_version(2)

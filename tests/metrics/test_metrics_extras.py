"""What the logs add for a user: step time, tokens/s and MFU (against the planner's FLOPs and a
known GPU peak), validation loss shown when evaluated, Weights & Biases as a sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moe_train.config import TrainConfig
from moe_train.data import TokenFile, write_tokens
from moe_train.hardware import peak_tflops
from moe_train.metrics import read_metrics
from moe_train.model import LEGACY_BODY, ModelConfig
from moe_train.parallel import ParallelConfig, ParallelState
from moe_train.plan import ClusterConfig, PlanOptions, make_plan, model_flops_per_token
from moe_train.routing import RouterConfig
from moe_train.training import logger as logger_mod
from moe_train.training.logger import TrainLogger
from moe_train.training.step import train_step
from moe_train.training.train_state import TrainState
from tests.helpers.training import SEQ_LEN, engine_and_plan, small_cfg


def test_known_gpu_peaks():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops("NVIDIA H200") == 989.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Tesla V100-SXM2-32GB") == 125.0
    assert peak_tflops("Tesla V100-PCIE-16GB") == 112.0
    assert peak_tflops("Some Future GPU") is None


def test_model_flops_are_the_planners():
    model = ModelConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                        **LEGACY_BODY)  # fmt: skip
    router = RouterConfig(kind="topk", top_k=2)
    cfg, cluster = TrainConfig(model=model, router=router), ClusterConfig(world_size=1)
    options = PlanOptions(meta_check=False, compare_routers=False, suggest=False)
    planned = make_plan(cfg, cluster, options)["compute"]["model_flops_per_token"]
    assert model_flops_per_token(model, router) == planned
    # GPT-2's body: 6 x active matmul parameters + attention; the position table is looked up,
    # not multiplied (the modern body's terms: tests/plan/test_plan_costs.py)
    dense = 256 * 64 + 2 * 4 * 64 * 64 + 64 * 128 * 2 + 64 * 8  # emb, attn, dense FFN, 8-way gate
    dense += 2 * 2 * 2 * 64 + 2 * 64  # LayerNorms (the planner counts them in N)
    active = dense + 2 * (64 * 128 * 2)  # k=2 experts of the one MoE layer
    assert planned == 6 * active + 12 * 64 * 64 * 2


def logger_cfg(run_dir, log_every: int, max_steps: int):
    """small_cfg with the logger's fields: 4 sequences of SEQ_LEN per step, no bar, no TB."""
    cfg = small_cfg()
    t = cfg.trainer
    t.run_dir, t.log_every, t.max_steps, t.global_batch_size = str(run_dir), log_every, max_steps, 4
    t.tensorboard = t.progress = False
    return cfg


def test_logger_records_step_time_tokens_per_s_and_mfu(tmp_path, capsys, monkeypatch):
    cfg = logger_cfg(tmp_path, log_every=1, max_steps=2)
    engine, plan = engine_and_plan(cfg)
    rng = torch.Generator().manual_seed(0)
    path = write_tokens(tmp_path / "t.bin", torch.randint(0, 256, (4000,), generator=rng), 256, "b")
    tokens = TokenFile(path)
    monkeypatch.setattr(logger_mod, "device_peak_flops", lambda device: 2e12)  # a known GPU
    logger = TrainLogger(cfg, ParallelState(ParallelConfig()), start=0)
    assert logger.peak_flops == 2e12  # x 1 GPU
    state = TrainState()
    for step in range(2):
        out = train_step(engine, tokens, plan, step, 1e-3, rank=0)
        state.finish_step(out.applied)
        logger.after_step(state, out, engine)
    logger.report_val(state, 3.25)
    logger.close()
    r = read_metrics(tmp_path)[-1]
    assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(4 * SEQ_LEN * 1e3 / r["step_ms"])
    flops = model_flops_per_token(cfg.model, cfg.router)  # the planner's
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 2e12)
    assert "step=2/2 val_loss=3.2500" in capsys.readouterr().out
    assert logger.elapsed() > 0
    monkeypatch.undo()
    no_peak = TrainLogger(logger_cfg(tmp_path / "cpu", 1, 1), ParallelState(ParallelConfig()), 0)
    assert no_peak.peak_flops is None  # no MFU where the peak is unknown (CPUs)


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    from moe_train.metrics.wandb_sink import WandbSink

    with pytest.raises(RuntimeError, match="pip install wandb") as e:
        WandbSink(tmp_path, "p", None, {})
    assert "WANDB_MODE=offline" in str(e.value) and "trainer.wandb=false" in str(e.value)


WANDB_RUN = """
import json, sys
from moe_train.metrics import MetricsWriter
from moe_train.metrics.wandb_sink import WandbSink
run_dir = sys.argv[1]
sink = WandbSink(run_dir, "moe-train-test", None, {"model": {"d_model": 8}})
w = MetricsWriter(run_dir, enabled=True, tensorboard=False, sinks=[sink])
for step in (1, 2, 3):
    w.log(step, {"loss": 5.0 - step, "tokens_per_s": 100.0 * step, "note": "x"})
summary = {"id": sink.run.id, "summary_loss": sink.run.summary["loss"], "step": sink.run.summary["_step"]}
w.close()
print(json.dumps(summary))
"""


@pytest.mark.slow
def test_wandb_logs_offline(tmp_path):
    pytest.importorskip("wandb")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
    }
    env.pop("WANDB_API_KEY", None)
    p = subprocess.run(
        [sys.executable, "-c", WANDB_RUN, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["summary_loss"] == 2.0 and out["step"] == 3  # the last logged values
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and out["id"] in runs[0].name
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == out["id"]
    assert len(read_metrics(tmp_path / "run")) == 3  # metrics.jsonl as always

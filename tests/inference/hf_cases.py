"""Tiny models of every supported Hugging Face family, shared by the hf tests."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moe_train.data.tokenizers import ByteTokenizer
from moe_train.model import ModelConfig, MoETransformer
from moe_train.routing import RouterConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = ModelConfig(
    vocab_size=256, seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
    d_ff=48, expert_d_ff=24, num_experts=4, moe_every=1, rope_theta=5000.0, norm_eps=1e-6,
    tie_embeddings=False,
)  # fmt: skip
TOPK = RouterConfig(kind="topk", top_k=2)
SWITCH = RouterConfig(kind="switch")

# family -> (model config, router config) that it holds, each exercising what it adds
CASES = {
    "mixtral": (BASE, TOPK),
    "qwen3_moe": (replace(BASE, qk_norm="head", moe_every=2, n_layers=3, first_dense=1), SWITCH),
    "qwen2_moe": (replace(BASE, tie_embeddings=True), SWITCH),
}


def perturbed(model: MoETransformer, seed: int = 0) -> MoETransformer:
    """Weights moved away from the init's ones (norms) and small values, so a mis-mapped tensor
    changes the logits clearly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_model(family: str, seed: int = 0) -> MoETransformer:
    cfg, router = CASES[family]
    torch.manual_seed(seed)
    return perturbed(MoETransformer(cfg, router, seed=seed), seed)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tiny_mc_accuracy(model: MoETransformer, task_file: Path) -> float:
    """Accuracy on docs/lm_eval's multiple-choice task from our model's own log-likelihoods: the
    choice whose tokens (after the question's, byte ids) have the highest summed log-probability,
    as lm-eval scores `acc`."""
    tok, right, docs = ByteTokenizer(), 0, []
    for line in task_file.read_text().splitlines():
        docs.append(json.loads(line))
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            ctx, cont = tok.encode(doc["question"]).tolist(), tok.encode(choice).tolist()
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0][0, :-1], dim=-1)
            scores.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)


def lm_eval_and_ours(
    model: MoETransformer, folder: Path, monkeypatch: Any, extra: str = ""
) -> tuple:
    """(lm-eval's acc on docs/lm_eval's local task for the exported `folder`, our model's own);
    skips without lm-eval and accelerate (`pip install -e ".[eval]"`)."""
    import pytest

    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.tasks import TaskManager

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the task's data_files path is relative to the repository root
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32{extra}",
        tasks=["moe_train_tiny_mc"],
        task_manager=TaskManager(include_path=str(root / "docs" / "lm_eval")),
        device="cpu",
        batch_size=4,
    )
    ours = tiny_mc_accuracy(model, root / "docs" / "lm_eval" / "tiny_mc.jsonl")
    return results["results"]["moe_train_tiny_mc"]["acc,none"], ours

"""Peak FLOP/s of known GPUs: what model FLOPs utilisation (MFU) is measured against, in training
(metrics.jsonl, the progress bar) and in the planner's header.

MFU = tokens/s x model FLOPs per token / (GPUs x peak). Model FLOPs per token are the planner's
(moe_train.plan.costs.model_flops_per_token): 6 x active matmul parameters + 12 x seq_len x
d_model x layers for attention scores, forward and backward, whatever recomputation the run does.

Peaks are dense (no 2:4 sparsity) BF16 tensor-core FLOP/s (FP16 on V100, which has no BF16), from
NVIDIA's datasheets: the H100/H200 datasheets list "with sparsity" figures, halved here.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), dense peak TFLOP/s, where the number comes from);
# the first match wins, so the more specific names come first
PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H200 NVL", 835.5, "NVIDIA H200 NVL datasheet: BF16 1,671 TFLOPS with sparsity / 2"),
    ("H200", 989.5, "NVIDIA H200 SXM datasheet: BF16 1,979 TFLOPS with sparsity / 2"),
    ("H100 PCIe", 756.5, "NVIDIA H100 PCIe datasheet: BF16 1,513 TFLOPS with sparsity / 2"),
    ("H100 NVL", 835.5, "NVIDIA H100 NVL datasheet: BF16 1,671 TFLOPS with sparsity / 2"),
    ("H100", 989.5, "NVIDIA H100 SXM datasheet: BF16 1,979 TFLOPS with sparsity / 2"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS (dense)"),
    ("V100-PCIE", 112.0, "NVIDIA V100 PCIe datasheet: tensor (FP16) 112 TFLOPS"),
    ("V100", 125.0, "NVIDIA V100 SXM2 datasheet: tensor (FP16) 125 TFLOPS"),
)


def peak_tflops(gpu_name: str) -> float | None:
    """Dense BF16/FP16 peak TFLOP/s of a GPU by (part of) its name; None when unknown."""
    for key, tflops, _ in PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of `device` (a GPU we know), else None (CPUs, unknown GPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12

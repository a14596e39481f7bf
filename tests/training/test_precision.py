"""precision=auto on a (mocked) V100, A100, H100 and on the CPU; explicit precisions as asked."""

from __future__ import annotations

import pytest
import torch

from moe_train.precision import autocast_dtype, native_bf16

CUDA0 = torch.device("cuda", 0)


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> list[object]:
    """Pretend one CUDA GPU of this compute capability is visible; returns the devices queried.

    ``is_bf16_supported`` answers True as torch does on a V100 (bf16 by emulation), so a policy
    that trusts it picks bf16 there."""
    asked: list[object] = []

    def capability_of(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)
    return asked


def test_auto_on_v100_is_fp16_not_emulated_bf16(monkeypatch):
    asked = fake_gpu(monkeypatch, (7, 0))
    assert autocast_dtype("auto", CUDA0) is torch.float16
    assert not native_bf16(CUDA0)
    assert asked and all(d == CUDA0 for d in asked)  # the run's device, not the current one


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])  # A100, A10/RTX 30, H100
def test_auto_on_ampere_and_newer_is_bf16(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    assert autocast_dtype("auto", CUDA0) is torch.bfloat16


def test_auto_on_turing_is_fp16(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))  # T4: no native bf16 either
    assert autocast_dtype("auto", CUDA0) is torch.float16


def test_auto_on_rocm_is_bf16(monkeypatch):
    fake_gpu(monkeypatch, (9, 4))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (0, 0))
    assert autocast_dtype("auto", CUDA0) is torch.bfloat16


def test_auto_on_cpu_is_fp32_even_with_a_gpu_present(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    assert autocast_dtype("auto", torch.device("cpu")) is None


def test_auto_on_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert not native_bf16(torch.device("cpu"))


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
@pytest.mark.parametrize("capability", [(7, 0), (9, 0)])
def test_explicit_precision_is_taken_as_asked(monkeypatch, precision, dtype, capability):
    fake_gpu(monkeypatch, capability)
    assert autocast_dtype(precision, CUDA0) is dtype
    assert autocast_dtype(precision, torch.device("cpu")) is dtype


def test_unknown_precision_names_the_key_and_choices():
    with pytest.raises(ValueError, match=r"trainer\.precision: 'fp8' is not one of auto, fp32"):
        autocast_dtype("fp8", torch.device("cpu"))

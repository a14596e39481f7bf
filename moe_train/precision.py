"""Mixed-precision policy: which autocast dtype a run uses on which device.

``auto`` is bf16 where the GPU computes in bf16 natively (Ampere, sm_80, and newer), fp16 with
dynamic loss scaling on older GPUs (V100, sm_70), fp32 on CPU. ``torch.cuda.is_bf16_supported()``
alone is not enough: it is True on a V100 too, where bf16 is emulated (slow, and without the
tensor cores); its ``including_emulation=False`` form is the question ``auto`` asks.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_EXPLICIT: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def native_bf16(device: torch.device) -> bool:
    """True when this CUDA device computes in bf16 natively: compute capability 8.0+ (or ROCm).

    The test of ``torch.cuda.is_bf16_supported(including_emulation=False)``, asked of ``device``
    itself rather than of the current device.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision`` on ``device``, or None for fp32.

    auto: bf16 on Ampere and newer GPUs, fp16 on older GPUs (the caller scales the loss:
    ``GradScaler(enabled=dtype == torch.float16)``), fp32 on CPU. fp32/bf16/fp16 are taken as
    asked.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision not in _EXPLICIT:
        raise ValueError(f"trainer.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return _EXPLICIT[precision]


__all__ = ["PRECISIONS", "autocast_dtype", "native_bf16"]

"""Per-rank GPU statistics from NVML (pip package nvidia-ml-py, module ``pynvml``).

``gpu_stats()`` returns memory, utilisation, temperature and power of this rank's GPU, or ``{}``
quietly when pynvml is not installed, the NVML library is missing or there is no GPU: it never
warns or raises, so the training loop can call it every log step on any machine. NVML is
initialised once per process and the outcome (success or failure) is cached.
``gather_gpu_stats()`` collects every rank's dict on rank 0.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_UNSET = object()
_nvml: Any = _UNSET  # the pynvml module once initialised, None when NVML is unusable


def _reset() -> None:
    """Forget the cached NVML state (tests)."""
    global _nvml
    _nvml = _UNSET


def _init_nvml() -> Any:
    """pynvml after a successful nvmlInit(), else None; tried once per process."""
    global _nvml
    if _nvml is not _UNSET:
        return _nvml
    _nvml = None
    try:
        import pynvml
    except ImportError:
        log.debug("gpu stats off: nvidia-ml-py is not installed")
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as e:  # NVMLError_LibraryNotFound without a driver
        log.debug("gpu stats off: NVML unavailable (%s)", e)
        return None
    atexit.register(_shutdown, pynvml)
    _nvml = pynvml
    return pynvml


def _shutdown(nvml: Any) -> None:
    with contextlib.suppress(Exception):  # best effort at exit
        nvml.nvmlShutdown()


def _default_index() -> int:
    """This rank's GPU as torch numbers it: the current device, else LOCAL_RANK, else 0."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", "0"))


def _handle(nvml: Any, index: int) -> Any:
    """NVML handle for torch device `index`. NVML ignores CUDA_VISIBLE_DEVICES (set by Slurm
    and docker), so map the visible index to the physical index or UUID first."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if index < len(entries):
            entry = entries[index]
            if entry.isdigit():
                return nvml.nvmlDeviceGetHandleByIndex(int(entry))
            return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(index)


def gpu_stats(device_index: int | None = None) -> dict[str, float]:
    """Stats of one GPU (torch's index; default: this rank's device), as floats:

    ``gpu_mem_used_mib``, ``gpu_mem_total_mib``, ``gpu_util_pct``, ``gpu_temp_c``, ``gpu_power_w``.
    A quantity the GPU does not report is left out; ``{}`` without NVML or GPU.
    """
    nvml = _init_nvml()
    if nvml is None:
        return {}
    try:
        handle = _handle(nvml, _default_index() if device_index is None else device_index)
    except nvml.NVMLError as e:  # no such device, e.g. a CPU-only rank on a GPU host
        log.debug("gpu stats: no NVML device for index %s (%s)", device_index, e)
        return {}

    queries = {
        "mem": lambda: nvml.nvmlDeviceGetMemoryInfo(handle),
        "util": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "temp": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        "power": lambda: nvml.nvmlDeviceGetPowerUsage(handle),  # milliwatts
    }
    raw: dict[str, Any] = {}
    for name, query in queries.items():
        try:
            raw[name] = query()
        except nvml.NVMLError:  # e.g. NVMLError_NotSupported for power on some boards
            pass

    mib = float(1 << 20)
    out: dict[str, float] = {}
    if "mem" in raw:
        out["gpu_mem_used_mib"] = raw["mem"].used / mib
        out["gpu_mem_total_mib"] = raw["mem"].total / mib
    if "util" in raw:
        out["gpu_util_pct"] = float(raw["util"])
    if "temp" in raw:
        out["gpu_temp_c"] = float(raw["temp"])
    if "power" in raw:
        out["gpu_power_w"] = raw["power"] / 1000.0
    return out


def gather_gpu_stats(stats: dict, group: Any = None) -> list[dict] | None:
    """Every rank's `stats` on the group's first rank (in group rank order); None elsewhere.

    Collective: all ranks of `group` must call it. Without torch.distributed: ``[stats]``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [stats]
    dst = 0 if group is None else dist.get_global_rank(group, 0)
    is_dst = dist.get_rank(group) == 0
    gathered: list[Any] | None = [None] * dist.get_world_size(group) if is_dst else None
    dist.gather_object(stats, gathered, dst=dst, group=group)
    return gathered if is_dst else None

"""GPU stats via NVML: quiet degradation without GPU/pynvml, unit conversions, rank-0 gather."""

from __future__ import annotations

import sys
import types
import warnings
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_train.metrics import gpu as gs

KEYS = {"gpu_mem_used_mib", "gpu_mem_total_mib", "gpu_util_pct", "gpu_temp_c", "gpu_power_w"}


@pytest.fixture(autouse=True)
def fresh_nvml_state():
    gs._reset()
    yield
    gs._reset()


def assert_quiet_empty(capfd) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert gs.gpu_stats() == {}
        assert gs.gpu_stats(0) == {}
    out, err = capfd.readouterr()
    assert out == "" and err == ""


class FakeNVMLError(Exception):
    pass


class FakeLibraryNotFound(FakeNVMLError):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


def fake_pynvml(*, init_error: type[Exception] | None = None, power: bool = True):
    """A pynvml stand-in with known readings; records calls in `.calls`."""
    m = types.ModuleType("pynvml")
    m.calls = []
    m.NVMLError = FakeNVMLError
    m.NVMLError_LibraryNotFound = FakeLibraryNotFound
    m.NVMLError_NotSupported = FakeNotSupported
    m.NVML_TEMPERATURE_GPU = 0

    def nvmlInit():
        m.calls.append(("init",))
        if init_error is not None:
            raise init_error()

    def by_index(i):
        m.calls.append(("index", i))
        if i >= 8:
            raise FakeNVMLError("Invalid Argument")
        return f"h{i}"

    def by_uuid(u):
        m.calls.append(("uuid", u))
        return f"h-{u}"

    def power_usage(h):
        if not power:
            raise FakeNotSupported()
        return 250_500  # mW

    m.nvmlInit = nvmlInit
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetHandleByIndex = by_index
    m.nvmlDeviceGetHandleByUUID = by_uuid
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        used=3 * 2**30, total=16 * 2**30, free=13 * 2**30
    )
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=42, memory=17)
    m.nvmlDeviceGetTemperature = lambda h, sensor: 65
    m.nvmlDeviceGetPowerUsage = power_usage
    return m


def test_quiet_on_this_machine(capfd):
    # Real environment: pynvml may or may not be installed; there is no GPU either way.
    assert_quiet_empty(capfd)


def test_quiet_without_pynvml(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert_quiet_empty(capfd)


def test_quiet_when_nvml_library_missing(monkeypatch, capfd):
    fake = fake_pynvml(init_error=FakeLibraryNotFound)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert_quiet_empty(capfd)
    assert fake.calls.count(("init",)) == 1  # failure cached, not retried


def test_real_pynvml_library_not_found_is_quiet(monkeypatch, capfd):
    pynvml = pytest.importorskip("pynvml")

    def raise_not_found():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", raise_not_found)
    assert_quiet_empty(capfd)


def test_readings_and_units(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    stats = gs.gpu_stats()
    assert set(stats) == KEYS
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["gpu_mem_used_mib"] == 3072.0
    assert stats["gpu_mem_total_mib"] == 16384.0
    assert stats["gpu_util_pct"] == 42.0
    assert stats["gpu_temp_c"] == 65.0
    assert stats["gpu_power_w"] == 250.5
    assert ("index", 0) in fake.calls
    gs.gpu_stats(1)
    gs.gpu_stats(2)
    assert fake.calls.count(("init",)) == 1  # NVML initialised once


def test_unsupported_reading_is_left_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power=False))
    stats = gs.gpu_stats(0)
    assert set(stats) == KEYS - {"gpu_power_w"}


def test_missing_device_gives_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gs.gpu_stats(9) == {}


def test_device_index_follows_visible_devices_and_local_rank(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert gs.gpu_stats() != {}
    assert fake.calls[-1] == ("index", 6)  # visible device 1 is physical GPU 6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    gs.gpu_stats(0)
    assert fake.calls[-1] == ("uuid", "GPU-aaaa")


def test_gather_without_distributed():
    assert not dist.is_initialized()
    assert gs.gather_gpu_stats({"gpu_util_pct": 1.0}) == [{"gpu_util_pct": 1.0}]


def _gather_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = gs.gather_gpu_stats({"rank": float(rank)} if rank else {})
        queue.put((rank, out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_to_rank0(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), queue), nprocs=world)
    results = dict(queue.get() for _ in range(world))
    assert results[0] == [{}, {"rank": 1.0}]
    assert results[1] is None

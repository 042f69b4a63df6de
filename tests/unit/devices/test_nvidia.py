"""The NVIDIA backend against a fake NVML that raises the real binding's errors."""

from __future__ import annotations

import pytest

from tests.fakes.nvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    FakeGpu,
    FakeMig,
    FakeNvml,
)
from vramancer.devices.nvidia import NvidiaBackend, NvmlError, query
from vramancer.devices.types import DeviceVendor, MigInstance

GIB = 1024**3


def test_no_driver_means_no_backend() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    assert NvidiaBackend.open(nvml) is None


def test_no_gpu_means_no_backend_and_nvml_is_shut_down() -> None:
    nvml = FakeNvml([])
    assert NvidiaBackend.open(nvml) is None
    assert nvml.initialised == 0
    assert nvml.calls[-1] == "nvmlShutdown"


def test_read_reports_memory_utilization_temperature_power_and_processes() -> None:
    gpu = FakeGpu(
        "GPU-aaaa",
        name="NVIDIA RTX 4090",
        total=24 * GIB,
        used=3 * GIB,
        util_percent=37,
        temperature=61,
        power_mw=215_500,
        processes=[(4321, 2 * GIB), (99, None)],
        graphics_processes=[(4321, 2 * GIB), (7, 64 * 1024**2)],
    )
    backend = NvidiaBackend.open(FakeNvml([FakeGpu("GPU-0"), gpu]))
    assert backend is not None
    assert backend.device_count() == 2
    snap = backend.read(1)
    assert snap.vendor is DeviceVendor.NVIDIA
    assert (snap.uuid, snap.name, snap.index, snap.cuda_index) == (
        "GPU-aaaa",
        "NVIDIA RTX 4090",
        1,
        1,
    )
    assert snap.memory_total_bytes == 24 * GIB
    assert snap.memory_used_bytes == 3 * GIB
    assert snap.memory_free_bytes == 21 * GIB
    assert snap.utilization_ratio == pytest.approx(0.37)
    assert snap.temperature_celsius == 61.0
    assert snap.power_watts == pytest.approx(215.5)
    assert [(p.pid, p.used_memory_bytes, p.name) for p in snap.processes] == [
        (7, 64 * 1024**2, "proc-7"),
        (99, None, "proc-99"),
        (4321, 2 * GIB, "proc-4321"),
    ]
    assert snap.mig == ()
    assert snap.torch_device == "cuda:1"


def test_values_a_gpu_does_not_report_are_none() -> None:
    gpu = FakeGpu("GPU-x", util_percent=None, temperature=None, power_mw=None)
    backend = NvidiaBackend.open(FakeNvml([gpu]))
    assert backend is not None
    snap = backend.read(0)
    assert (snap.utilization_ratio, snap.temperature_celsius, snap.power_watts) == (
        None,
        None,
        None,
    )


def test_mig_slices_are_listed_and_empty_slots_skipped() -> None:
    gpu = FakeGpu(
        "GPU-mig",
        total=80 * GIB,
        util_percent=None,
        mig=[FakeMig("MIG-1", 10 * GIB, 1 * GIB), None, FakeMig("MIG-3", 20 * GIB, 0)],
    )
    backend = NvidiaBackend.open(FakeNvml([gpu]))
    assert backend is not None
    assert backend.read(0).mig == (
        MigInstance(index=0, uuid="MIG-1", memory_total_bytes=10 * GIB, memory_used_bytes=GIB),
        MigInstance(index=2, uuid="MIG-3", memory_total_bytes=20 * GIB, memory_used_bytes=0),
    )


def test_a_lost_gpu_raises_a_typed_error_with_the_nvml_code() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    backend = NvidiaBackend.open(nvml)
    assert backend is not None
    nvml.fail["nvmlDeviceGetMemoryInfo"] = NVML_ERROR_GPU_IS_LOST
    with pytest.raises(NvmlError) as info:
        backend.read(0)
    assert info.value.details["nvml_code"] == NVML_ERROR_GPU_IS_LOST
    assert "nvmlDeviceGetMemoryInfo" in info.value.message


def test_query_maps_not_available_to_none_and_missing_calls_to_none() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    nvml.fail["nvmlDeviceGetPowerUsage"] = NVML_ERROR_NO_PERMISSION
    assert query(nvml, "nvmlDeviceGetPowerUsage", ("gpu", 0)) is None
    assert query(nvml, "nvmlDeviceGetSomethingFromTheFuture", ("gpu", 0)) is None
    assert query(nvml, "nvmlDeviceGetTemperature", ("gpu", 0), 0) == 45


def test_close_shuts_nvml_down_once() -> None:
    nvml = FakeNvml([FakeGpu("GPU-a")])
    backend = NvidiaBackend.open(nvml)
    assert backend is not None and nvml.initialised == 1
    backend.close()
    backend.close()
    assert nvml.initialised == 0
    assert nvml.calls.count("nvmlShutdown") == 1


def test_a_gpu_nvml_may_not_open_is_skipped_and_cuda_indices_stay_nvml_s() -> None:
    """In a container given GPU 1 only, NVML can list GPU 0 and refuse to open it."""

    class PartlyVisible(FakeNvml):
        def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
            if index == 0:
                raise self.NVMLError(NVML_ERROR_NO_PERMISSION)
            return super().nvmlDeviceGetHandleByIndex(index)

    nvml = PartlyVisible([FakeGpu("GPU-hidden"), FakeGpu("GPU-mine", used=GIB)])
    backend = NvidiaBackend.open(nvml)
    assert backend is not None and backend.device_count() == 1
    snap = backend.read(0)
    assert (snap.uuid, snap.memory_used_bytes, snap.cuda_index) == ("GPU-mine", GIB, 1)
    assert snap.torch_device == "cuda:1"
    nobody = PartlyVisible([FakeGpu("GPU-hidden")])
    assert NvidiaBackend.open(nobody) is None and nobody.initialised == 0

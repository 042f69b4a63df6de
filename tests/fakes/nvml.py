"""A fake NVML for tests on machines without an NVIDIA GPU.

It reuses the real binding's error class and constants (``pynvml`` is a dev dependency), so the
NVIDIA backend sees exactly the exceptions and codes the real library raises; only the devices
are made up. Set ``FakeGpu`` fields to change readings; ``fail`` makes the named call raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

NVMLError = pynvml.NVMLError
NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
NVML_ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE


@dataclass
class FakeMig:
    uuid: str
    total: int
    used: int


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA Fake 24GB"
    total: int = 24 * 1024**3
    used: int = 0
    #: Percent busy; None: not supported (raises NOT_SUPPORTED like MIG mode does).
    util_percent: int | None = 10
    temperature: int | None = 45
    power_mw: int | None = 120_000
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    mig: list[FakeMig | None] | None = None


class FakeNvml:
    """Stands in for the ``pynvml`` module: same function names, same errors."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        #: function name -> NVML error code to raise from it
        self.fail: dict[str, int] = {}
        self.calls: list[str] = []
        self.initialised = 0

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise NVMLError(self.fail[name])

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._enter("nvmlDeviceGetHandleByIndex")
        return ("gpu", index)

    def _gpu(self, handle: Any) -> FakeGpu:
        return self.gpus[handle[1]]

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetUUID")
        if handle[0] == "mig":
            mig = self._mig(handle)
            return mig.uuid
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo")
        if handle[0] == "mig":
            mig = self._mig(handle)
            return SimpleNamespace(total=mig.total, used=mig.used, free=mig.total - mig.used)
        gpu = self._gpu(handle)
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        self._enter("nvmlDeviceGetUtilizationRates")
        gpu = self._gpu(handle)
        if gpu.util_percent is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=gpu.util_percent, memory=0)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature")
        assert sensor == NVML_TEMPERATURE_GPU
        gpu = self._gpu(handle)
        if gpu.temperature is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        gpu = self._gpu(handle)
        if gpu.power_mw is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        self._enter("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self._gpu(handle).processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        self._enter("nvmlDeviceGetGraphicsRunningProcesses")
        gpu = self._gpu(handle)
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in gpu.graphics_processes]

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        self._enter("nvmlSystemGetProcessName")
        return f"proc-{pid}".encode()

    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int]:
        self._enter("nvmlDeviceGetMigMode")
        gpu = self._gpu(handle)
        if gpu.mig is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return (NVML_DEVICE_MIG_ENABLE, NVML_DEVICE_MIG_ENABLE)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount")
        return len(self._gpu(handle).mig or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        slots = self._gpu(handle).mig or []
        if slots[index] is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return ("mig", handle[1], index)

    def _mig(self, handle: Any) -> FakeMig:
        mig = (self.gpus[handle[1]].mig or [])[handle[2]]
        assert mig is not None
        return mig

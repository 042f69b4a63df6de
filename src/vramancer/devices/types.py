"""Frozen device snapshots: what policies and the API see. Never a live driver handle.

Units are in field names (``memory_free_bytes``, ``temperature_celsius``). A value a backend
cannot report is ``None`` ("not available"), never a guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class DeviceVendor(StrEnum):
    """Where a device's telemetry comes from."""

    #: NVIDIA GPU read through NVML (nvidia-ml-py).
    NVIDIA = "nvidia"
    #: AMD GPU read through amdsmi or sysfs.
    AMD = "amd"
    #: Apple Silicon GPU read through torch.mps.
    APPLE = "apple"
    #: A device declared in config for demos and tests; never holds real tensors.
    SIMULATED = "simulated"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    used_memory_bytes: int | None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class MigInstance:
    """A MIG slice of an NVIDIA GPU."""

    index: int
    uuid: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU at one instant. ``index`` is VRAMancer's index (the one ``gpu: N`` pins to)."""

    index: int
    uuid: str
    name: str
    vendor: DeviceVendor
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    mig: tuple[MigInstance, ...] = ()
    #: Monotonic time (the runtime clock) at which this reading was taken.
    taken_at: float = 0.0
    #: Set when the last poll of this device failed; the other fields are the last good reading.
    error: str | None = None
    #: Index the process sees in CUDA_VISIBLE_DEVICES / torch (``cuda:N``); None if not CUDA.
    cuda_index: int | None = None

    @property
    def simulated(self) -> bool:
        return self.vendor is DeviceVendor.SIMULATED

    @property
    def torch_device(self) -> str:
        """``cuda:N`` for a real CUDA (or ROCm) device, ``mps`` for Apple Silicon, else ``cpu``.

        Simulated devices run on the CPU.
        """
        if self.vendor is DeviceVendor.APPLE:
            return "mps"
        if self.cuda_index is None or self.simulated:
            return "cpu"
        return f"cuda:{self.cuda_index}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["vendor"] = self.vendor.value
        data["simulated"] = self.simulated
        data["torch_device"] = self.torch_device
        return data


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """The host's CPU and memory (psutil). ``memory_available_bytes`` is Linux MemAvailable."""

    cpu_count: int
    cpu_utilization_ratio: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_used_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    taken_at: float = 0.0
    hostname: str = ""
    platform: str = ""
    machine: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SystemSnapshot:
    """The host and every GPU, as last polled."""

    host: HostSnapshot
    gpus: tuple[GpuSnapshot, ...] = field(default_factory=tuple)
    taken_at: float = 0.0

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    def gpu(self, index: int) -> GpuSnapshot | None:
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host.as_dict(),
            "gpus": [g.as_dict() for g in self.gpus],
            "taken_at": self.taken_at,
            "cpu_only": self.cpu_only,
        }

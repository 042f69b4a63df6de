"""Build frozen snapshots for policy tests."""

from __future__ import annotations

from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot

GIB = 1024**3


def gpu(
    index: int,
    total: int,
    used: int,
    vendor: DeviceVendor = DeviceVendor.NVIDIA,
    error: str | None = None,
) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        uuid=f"GPU-{index}" if vendor is not DeviceVendor.SIMULATED else f"sim-{index}",
        name=f"GPU {index}",
        vendor=vendor,
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=total - used,
        error=error,
        cuda_index=index if vendor is DeviceVendor.NVIDIA else None,
    )


def snapshot(*gpus: GpuSnapshot, host_total: int = 32 * GIB, host_available: int = 16 * GIB):  # type: ignore[no-untyped-def]
    host = HostSnapshot(
        cpu_count=8,
        cpu_utilization_ratio=0.1,
        memory_total_bytes=host_total,
        memory_available_bytes=host_available,
        memory_used_bytes=host_total - host_available,
        swap_total_bytes=0,
        swap_used_bytes=0,
    )
    return SystemSnapshot(host=host, gpus=tuple(gpus))

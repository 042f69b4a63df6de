"""The NVIDIA path on a real GPU (``pytest -m gpu``; skipped where no NVIDIA GPU answers)."""

from __future__ import annotations

import pytest

from vramancer.devices.nvidia import NvidiaBackend


@pytest.mark.gpu
def test_real_nvml_reads_every_gpu() -> None:
    backend = NvidiaBackend.open()
    assert backend is not None, "NVML answered in conftest but the backend found no GPU"
    try:
        for i in range(backend.device_count()):
            snap = backend.read(i)
            assert snap.uuid.startswith(("GPU-", "MIG-"))
            assert snap.memory_total_bytes > 0
            assert 0 <= snap.memory_used_bytes <= snap.memory_total_bytes
            assert snap.memory_free_bytes <= snap.memory_total_bytes
            if snap.utilization_ratio is not None:
                assert 0.0 <= snap.utilization_ratio <= 1.0
            if snap.temperature_celsius is not None:
                assert 0.0 < snap.temperature_celsius < 120.0
            if snap.power_watts is not None:
                assert 0.0 <= snap.power_watts < 2000.0
    finally:
        backend.close()

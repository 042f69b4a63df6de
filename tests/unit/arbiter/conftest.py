"""Fixtures for the arbiter's unit tests: a device-manager double returning fixed snapshots."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.clock import ManualClock
from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB


class FixedDevices:
    """Stands in for the DeviceManager: ``snapshot()`` returns GPUs of the given sizes."""

    def __init__(self, *gpu_bytes: int) -> None:
        self.gpu_bytes = list(gpu_bytes)
        #: What the driver reports used, by GPU index (0 when missing).
        self.used: dict[int, int] = {}
        self.calls = 0

    def snapshot(self) -> SystemSnapshot:
        self.calls += 1
        host = HostSnapshot(
            cpu_count=2,
            cpu_utilization_ratio=0.0,
            memory_total_bytes=8 * GIB,
            memory_available_bytes=4 * GIB,
            memory_used_bytes=4 * GIB,
            swap_total_bytes=0,
            swap_used_bytes=0,
        )
        gpus = tuple(
            GpuSnapshot(
                index=i,
                uuid=f"SIM-{i}",
                name=f"sim{i}",
                vendor=DeviceVendor.SIMULATED,
                memory_total_bytes=size,
                memory_used_bytes=self.used.get(i, 0),
                memory_free_bytes=size - self.used.get(i, 0),
            )
            for i, size in enumerate(self.gpu_bytes)
        )
        return SystemSnapshot(host=host, gpus=gpus)


MakeArbiter = Callable[..., Arbiter]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def bus(clock: ManualClock) -> EventBus:
    return EventBus(clock=clock.time)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(node="test")


@pytest.fixture
def make_arbiter(clock: ManualClock, bus: EventBus, metrics: Metrics) -> MakeArbiter:
    """``make_arbiter(*gpu_bytes, **settings)``: an arbiter over fixed simulated GPUs."""

    def make(*gpu_bytes: int, devices: FixedDevices | None = None, **settings: object) -> Arbiter:
        source = devices if devices is not None else FixedDevices(*gpu_bytes)
        return Arbiter(
            ArbiterSettings.model_validate(settings),
            devices=source,
            events=bus,
            metrics=metrics,
            clock=clock,
        )

    return make

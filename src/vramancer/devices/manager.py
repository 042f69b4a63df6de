"""PLACEHOLDER (issue 2 replaces it): live device handles and the cached snapshot."""

from __future__ import annotations

import os
import platform
import socket

import psutil

from vramancer.clock import Clock
from vramancer.devices.settings import DevicesSettings
from vramancer.devices.types import HostSnapshot, SystemSnapshot
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics


class DeviceManager:
    def __init__(
        self, settings: DevicesSettings, *, events: EventBus, metrics: Metrics, clock: Clock
    ) -> None:
        self.settings = settings
        self.events = events
        self.metrics = metrics
        self.clock = clock

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def snapshot(self) -> SystemSnapshot:
        vm = psutil.virtual_memory()
        sw = psutil.swap_memory()
        host = HostSnapshot(
            cpu_count=os.cpu_count() or 1,
            cpu_utilization_ratio=0.0,
            memory_total_bytes=vm.total,
            memory_available_bytes=vm.available,
            memory_used_bytes=vm.used,
            swap_total_bytes=sw.total,
            swap_used_bytes=sw.used,
            taken_at=self.clock.monotonic(),
            hostname=socket.gethostname(),
            platform=platform.system(),
            machine=platform.machine(),
        )
        return SystemSnapshot(host=host, gpus=(), taken_at=host.taken_at)

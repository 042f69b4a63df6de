"""PLACEHOLDER (issue 3 replaces it): the tiered block store."""

from __future__ import annotations

from pathlib import Path

from vramancer.clock import Clock
from vramancer.devices.manager import DeviceManager
from vramancer.events import EventBus
from vramancer.memory.settings import MemorySettings
from vramancer.observability.metrics import Metrics


class TieredStore:
    def __init__(
        self,
        settings: MemorySettings,
        *,
        data_dir: Path,
        devices: DeviceManager,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

"""PLACEHOLDER (issue 5 replaces it): the task service."""

from __future__ import annotations

from pathlib import Path

from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import Clock
from vramancer.devices.manager import DeviceManager
from vramancer.events import EventBus
from vramancer.memory.store import TieredStore
from vramancer.observability.metrics import Metrics
from vramancer.tasks.settings import TasksSettings


class TaskService:
    def __init__(
        self,
        settings: TasksSettings,
        *,
        data_dir: Path,
        devices: DeviceManager,
        arbiter: Arbiter,
        memory: TieredStore,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

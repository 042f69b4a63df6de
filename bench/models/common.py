"""Shared set-up of the model benchmarks: the device manager (simulated GPUs only unless told),
the arbiter and a model manager, without the rest of the runtime (tasks, memory tiers) so that
nothing else runs beside what is measured."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import SystemClock
from vramancer.config import Settings
from vramancer.devices.manager import DeviceManager
from vramancer.events import EventBus
from vramancer.models.manager import ModelManager
from vramancer.observability.metrics import Metrics


@dataclass
class Stack:
    devices: DeviceManager
    arbiter: Arbiter
    models: ModelManager
    events: EventBus


@asynccontextmanager
async def stack(**settings: Any) -> AsyncIterator[Stack]:
    settings.setdefault("data_dir", tempfile.mkdtemp(prefix="vrm-bench-"))
    s = Settings(**settings)
    clock = SystemClock()
    events = EventBus()
    metrics = Metrics(node="bench")
    devices = DeviceManager(s.devices, events=events, metrics=metrics, clock=clock)
    arbiter = Arbiter(s.arbiter, devices=devices, events=events, metrics=metrics, clock=clock)
    models = ModelManager(
        s, devices=devices, arbiter=arbiter, events=events, metrics=metrics, clock=clock
    )
    await devices.start()
    await arbiter.start()
    await models.start()
    try:
        yield Stack(devices, arbiter, models, events)
    finally:
        await models.stop()
        await arbiter.stop()
        await devices.stop()


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)

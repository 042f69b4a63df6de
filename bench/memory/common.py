"""What the memory benchmarks share: an opened ``TieredStore`` on a scratch directory."""

from __future__ import annotations

from pathlib import Path

from vramancer.clock import Clock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.memory.compression import CompressionManager
from vramancer.memory.settings import MemorySettings
from vramancer.memory.store import StorePolicy, TieredStore
from vramancer.observability.metrics import Metrics


def open_store(
    settings: MemorySettings,
    directory: Path,
    clock: Clock,
    *,
    policy: StorePolicy | None = None,
    compression: CompressionManager | None = None,
) -> TieredStore:
    """A real store (its own event bus, metrics and device manager) opened on ``directory``."""
    events = EventBus(clock=clock.time)
    metrics = Metrics(node="bench")
    store = TieredStore(
        settings,
        data_dir=directory,
        devices=DeviceManager(DevicesSettings(), events=events, metrics=metrics, clock=clock),
        events=events,
        metrics=metrics,
        clock=clock,
        policy=policy,
        compression=compression,
    )
    store.open()
    return store

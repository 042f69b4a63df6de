"""A task service on real parts (SQLite, subprocesses, the device manager with simulated GPUs,
the arbiter) with a manual clock and no background loops: tests drive ``run_once()``.

The memory store is a double (``FakeMemory``) by default: maintenance tasks call two of its
methods, and counting those calls is what most tests check; ``store=True`` gives the service a
real ``TieredStore`` (small tiers, same manual clock) to see blocks really move.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.unit.memory.store_support import make_settings

from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.clock import ManualClock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings, SimulatedDevice
from vramancer.events import Event, EventBus
from vramancer.memory.store import TieredStore
from vramancer.observability.metrics import Metrics
from vramancer.tasks.model import TaskState
from vramancer.tasks.service import TaskService
from vramancer.tasks.settings import TasksSettings


@dataclass
class FakeMemory:
    """Counts maintenance calls; ``fail`` makes them raise."""

    warmups: list[int] = field(default_factory=list)
    compressions: list[int] = field(default_factory=list)
    fail: bool = False

    def warmup(self, max_blocks: int) -> int:
        if self.fail:
            raise RuntimeError("store closed")
        self.warmups.append(max_blocks)
        return 3

    def compress_cold(self, max_blocks: int) -> int:
        self.compressions.append(max_blocks)
        return 1


@dataclass
class Harness:
    svc: TaskService
    clock: ManualClock
    devices: DeviceManager
    arbiter: Arbiter
    memory: FakeMemory
    events: EventBus
    metrics: Metrics
    data_dir: Path
    store: TieredStore | None = None
    seen: list[Event] = field(default_factory=list)

    def transitions(self, task_id: str) -> list[str]:
        """The states a task went through, from its events, in order."""
        return [e.data["state"] for e in self.seen if e.data["task_id"] == task_id]

    async def state(self, task_id: str) -> TaskState:
        return (await self.svc.status(task_id)).state

    def refresh(self) -> None:
        """A new device poll at the current (manual) time: telemetry stays fresh."""
        self.devices.refresh()

    def metric(self, name: str, **labels: str) -> float:
        # every sample carries the runtime's node label (observability.metrics.NodeRegistry)
        value = self.metrics.registry.get_sample_value(name, {**labels, "node": self.metrics.node})
        return 0.0 if value is None else value


GPU_24 = SimulatedDevice(name="sim0", memory="24GiB")
GPU_12 = SimulatedDevice(name="sim1", memory="12GiB")

MakeHarness = Callable[..., Coroutine[Any, Any, Harness]]


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    made: list[Harness] = []

    async def make(
        gpus: list[SimulatedDevice] | None = None,
        data_dir: Path | None = None,
        store: bool = False,
        **tasks: Any,
    ) -> Harness:
        clock = ManualClock()
        events = EventBus(clock=clock.time)
        metrics = Metrics(node="test")
        devices = DeviceManager(
            DevicesSettings(backends=[], simulated=list(gpus if gpus is not None else [GPU_24])),
            events=events,
            metrics=metrics,
            clock=clock,
        )
        devices.refresh()
        arbiter = Arbiter(
            ArbiterSettings(), devices=devices, events=events, metrics=metrics, clock=clock
        )
        await arbiter.start()
        tasks.setdefault("backoff_base_s", 1.0)
        tasks.setdefault("kill_grace_s", 0.2)
        tasks.setdefault("maintenance_idle_s", 0.0)
        tasks.setdefault("maintenance_max_cpu_ratio", 1.0)  # the real host CPU: not ours to set
        tasks.setdefault("auto_maintenance", False)  # tests that want it turn it on
        settings = TasksSettings(**tasks)
        memory = FakeMemory()
        directory = data_dir or tmp_path / f"data{len(made)}"
        real_store = None
        if store:
            real_store = TieredStore(
                make_settings(),
                data_dir=directory,
                devices=devices,
                events=events,
                metrics=metrics,
                clock=clock,
            )
            real_store.open()
        svc = TaskService(
            settings,
            data_dir=directory,
            devices=devices,
            arbiter=arbiter,
            memory=real_store if real_store is not None else memory,
            events=events,
            metrics=metrics,
            clock=clock,
        )
        h = Harness(svc, clock, devices, arbiter, memory, events, metrics, directory, real_store)
        events.subscribe(h.seen.append, "task_state")
        await svc.start(dispatch=False)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.svc.stop()
        await h.arbiter.stop()
        if h.store is not None:
            h.store.close()

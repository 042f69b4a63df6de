"""``Runtime``: the composition root. Builds every subsystem from one ``Settings``.

The HTTP API, the CLI and library users all go through it::

    async with Runtime(Settings.load()) as rt:
        rt.devices.snapshot(); rt.memory.put("k", b"..."); await rt.models.ensure_loaded("clip")

Start order follows dependencies (devices, memory, its host-memory regulator, arbiter, models,
tasks); stop is the reverse.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Protocol

from vramancer import event_types as ev
from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import Clock, SystemClock
from vramancer.config import Settings
from vramancer.devices.manager import DeviceManager
from vramancer.events import EventBus
from vramancer.files import private_dir
from vramancer.memory.regulator import HostMemoryRegulator
from vramancer.memory.store import TieredStore
from vramancer.models.manager import ModelManager
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics
from vramancer.resources.orchestrator import ResourceOrchestrator
from vramancer.tasks.service import TaskService

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Runtime:
    """Owns the subsystems' lifecycle. Construct cheaply; ``start()`` does the I/O."""

    def __init__(self, settings: Settings | None = None, *, clock: Clock | None = None) -> None:
        self.settings = settings if settings is not None else Settings.load()
        self.clock: Clock = clock if clock is not None else SystemClock()
        s = self.settings
        self.events = EventBus(clock=self.clock.time)
        self.metrics = Metrics(node=s.node_name)
        self.devices = DeviceManager(
            s.devices, events=self.events, metrics=self.metrics, clock=self.clock
        )
        self.memory = TieredStore(
            s.memory,
            data_dir=s.data_dir,
            devices=self.devices,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.regulator = HostMemoryRegulator(
            s.memory.regulator,
            store=self.memory,
            devices=self.devices,
            events=self.events,
            clock=self.clock,
            metrics=self.metrics,
        )
        self.arbiter = Arbiter(
            s.arbiter,
            devices=self.devices,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.models = ModelManager(
            s,
            devices=self.devices,
            arbiter=self.arbiter,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.resources = ResourceOrchestrator(
            s.resources, self.devices, metrics=self.metrics, models=self.models
        )
        self.tasks = TaskService(
            s.tasks,
            data_dir=s.data_dir,
            devices=self.devices,
            arbiter=self.arbiter,
            memory=self.memory,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
            models=self.models,
        )
        self._components: list[Component] = [
            self.devices,
            self.memory,
            self.regulator,
            self.arbiter,
            self.models,
            self.tasks,
        ]
        self._started: list[Component] = []
        self.running = False

    async def start(self) -> None:
        """Create the data directory (0700: it holds task bodies with their ``env``, logs and
        stored blocks; one an earlier version left group- or world-readable is tightened),
        turn tracing on if asked, start every subsystem."""
        if self.running:
            return
        private_dir(self.settings.data_dir)
        tracing.configure(self.settings.tracing)
        try:
            for component in self._components:
                await component.start()
                self._started.append(component)
        except BaseException:
            await self.stop()
            raise
        self.running = True
        self.events.publish(ev.RuntimeStarted(node=self.settings.node_name))

    async def stop(self) -> None:
        """Stop what was started, in reverse order; errors are logged, every part is stopped.
        Then export the spans still queued (when tracing is on)."""
        while self._started:
            component = self._started.pop()
            try:
                await component.stop()
            except Exception:
                log.exception("stopping %s failed", type(component).__name__)
        self.running = False
        if tracing.enabled():
            await asyncio.to_thread(tracing.flush)

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

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
import os
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from vramancer import event_types as ev
from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import Clock, SystemClock
from vramancer.config import Settings
from vramancer.devices.holders import GpuHolders, holders_by_gpu
from vramancer.devices.manager import DeviceManager
from vramancer.devices.types import SystemSnapshot
from vramancer.errors import ConfigError
from vramancer.events import EventBus
from vramancer.fastpath.service import FastpathService
from vramancer.files import private_dir
from vramancer.memory.regulator import HostMemoryRegulator
from vramancer.memory.store import TieredStore
from vramancer.models.manager import ModelManager
from vramancer.observability import tracing
from vramancer.observability.eventlog import EventLog
from vramancer.observability.metrics import Metrics
from vramancer.release.layout import Releases, deploy_dir
from vramancer.replication.service import HaService
from vramancer.resources.orchestrator import ResourceOrchestrator
from vramancer.tasks import holders as task_holders
from vramancer.tasks.service import TaskService

if TYPE_CHECKING:
    from vramancer.pool.node import PoolNode

log = logging.getLogger(__name__)


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class NodeRole(StrEnum):
    """What this process is: ``vramancer serve`` (the API, and in a pool an orchestrator) or
    ``vramancer worker`` (a node of a pool that only runs the tasks given to its GPUs)."""

    SERVE = "serve"
    WORKER = "worker"


class _TasksPart:
    """The task service, dispatching or not (a pool's worker only runs what it is given)."""

    def __init__(self, tasks: TaskService, *, dispatch: bool) -> None:
        self.tasks, self.dispatch = tasks, dispatch

    async def start(self) -> None:
        await self.tasks.start(dispatch=self.dispatch)

    async def stop(self) -> None:
        await self.tasks.stop()


class _PoolWork:
    """A pool node's heartbeat, worker and dispatch lease: started once the tasks are."""

    def __init__(self, pool: PoolNode) -> None:
        self.pool = pool

    async def start(self) -> None:
        await self.pool.start_work()

    async def stop(self) -> None:
        await self.pool.stop_work()


class _FastpathPart:
    """The fastpath's server and probes; while it runs, the memory store asks it for the blocks
    this node does not hold."""

    def __init__(
        self, fastpath: FastpathService, memory: TieredStore, pool: PoolNode | None, node: str
    ) -> None:
        self.fastpath, self.memory, self.pool, self.node = fastpath, memory, pool, node

    async def start(self) -> None:
        if self.pool is not None:  # the pool's nodes are peers; this one announces itself
            self.fastpath.discover = self.pool.fastpath_peers
        await asyncio.to_thread(self.fastpath.start)
        if self.pool is not None:
            self.pool.fastpath_address = self.fastpath.advertised(self.node)
        self.memory.remote = self.fastpath.fetch
        self.memory.remote_keep = self.fastpath.settings.keep_fetched

    async def stop(self) -> None:
        self.memory.remote = None
        await asyncio.to_thread(self.fastpath.stop)


def _pool_node() -> type[PoolNode]:
    """``PoolNode``, imported only for a pool: nats-py is an extra (``vramancer[nats]``)."""
    try:
        from vramancer.pool.node import PoolNode
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("nats"):
            raise
        raise ConfigError(
            "[nats] url is set but the NATS client is not installed: pip install 'vramancer[nats]'"
        ) from None
    return PoolNode


class Runtime:
    """Owns the subsystems' lifecycle. Construct cheaply; ``start()`` does the I/O."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        clock: Clock | None = None,
        role: NodeRole = NodeRole.SERVE,
    ) -> None:
        self.settings = settings if settings is not None else Settings.load()
        self.role = role
        self.clock: Clock = clock if clock is not None else SystemClock()
        s = self.settings
        # Before anything takes the data directory: a missing extra is what to fix first.
        pool_node = _pool_node() if s.nats.enabled or role is NodeRole.WORKER else None
        self.events = EventBus(clock=self.clock.time)
        #: What happens, in the log (``vramancer.events``): tasks, allocations, models ...
        self.event_log = EventLog(self.events)
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
        #: This node of a pool of machines (``[nats] url``); None: this machine alone.
        self.pool: PoolNode | None = None
        if pool_node is not None:
            self.pool = pool_node(
                s.nats,
                s.tasks,
                node=s.node_name,
                orchestrator=role is NodeRole.SERVE,
                clock=self.clock,
                estimate_alpha=s.tasks.estimate_alpha,
                metrics=self.metrics,
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
            queue=self.pool.queue if self.pool is not None else None,
            pool=self.pool.scheduler if self.pool is not None else None,
            node=s.node_name,
            shared_queue=self.pool is not None,
            releases=Releases(deploy_dir(s.release, s.data_dir)),
        )
        #: Blocks between nodes (``[fastpath] port``); None: off.
        self.fastpath: FastpathService | None = None
        if s.fastpath.port is not None:
            self.fastpath = FastpathService(
                s.fastpath,
                source=self.memory,
                max_put_bytes=s.memory.max_block_size,
                metrics=self.metrics,
                clock=self.clock,
            )
        self._components: list[Component] = [
            self.devices,
            self.memory,
            *self._fastpath_part(),
            self.regulator,
            self.arbiter,
            self.models,
        ]
        if self.pool is None:
            self._components.append(self.tasks)
        else:
            self.pool.attach(self.tasks, self.devices, self.arbiter)
            self._components += [
                self.pool,
                _TasksPart(self.tasks, dispatch=role is NodeRole.SERVE),
                _PoolWork(self.pool),
            ]
        # HA replication (docs/ha.md), only when on: its service starts first (it decides the
        # role) and a standby starts the memory store and the task service without their loops.
        self.ha: HaService | None = None
        if s.ha_replication:
            self.ha = HaService(
                s,
                memory=self.memory,
                tasks=self.tasks,
                models=self.models,
                arbiter=self.arbiter,
                events=self.events,
                metrics=self.metrics,
                clock=self.clock,
            )
            self._components = self.ha.wrap(self._components)
        self._started: list[Component] = []
        self.running = False
        self._holder_gauges = task_holders.HolderGauges(self.metrics)
        self.devices.on_refresh(self._export_holders)

    def gpu_holders(self, snapshot: SystemSnapshot | None = None) -> dict[int, GpuHolders]:
        """Who holds what on each GPU (``devices/holders.py``): used, reserved, external and
        the holders, from the latest snapshot and the arbiter's allocations now."""
        snap = snapshot if snapshot is not None else self.devices.snapshot()
        held = task_holders.reservations(
            self.arbiter.allocations(), self.tasks.workers.active, snap
        )
        ours = frozenset({os.getpid()})
        if any(
            m.backend.value == "ollama" and m.used_vram_bytes for m in self.models.list_models()
        ):
            ours |= task_holders.process_pids(snap, "ollama")
        return holders_by_gpu(snap.gpus, held, our_pids=ours)

    def devices_report(self) -> dict[str, Any]:
        """The ``GET /v1/devices`` body: ``devices.report()`` (cached per snapshot, not
        mutated) with each GPU's ``memory_reserved_bytes``, ``memory_external_bytes`` and
        ``holders`` added."""
        report = self.devices.report()
        split = self.gpu_holders()
        devices = []
        for entry in report["devices"]:
            found = split.get(entry["index"])
            devices.append({**entry, **found.as_dict()} if found is not None else entry)
        return {**report, "devices": devices}

    def _export_holders(self, snapshot: SystemSnapshot) -> None:
        self._holder_gauges.export(snapshot, self.gpu_holders(snapshot))

    def _fastpath_part(self) -> list[Component]:
        if self.fastpath is None:
            return []
        return [_FastpathPart(self.fastpath, self.memory, self.pool, self.settings.node_name)]

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

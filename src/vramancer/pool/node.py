"""``PoolNode``: everything a daemon needs to be one node of a pool, composed in one place.

``vramancer serve`` with ``[nats] url`` is an *orchestrator*: it takes submissions, keeps the
shared queue's mirror, competes for the dispatch lease (``PoolScheduler``) and, like every node,
announces itself and runs the tasks given to its own GPUs (``PoolWorker``). ``vramancer worker``
is a *worker*: the same without the scheduler and the HTTP API.

The connection comes up in the background: a daemon whose NATS servers are down starts anyway,
reports ``nats: disconnected``, refuses submissions with 503 ``nats_unavailable``, answers reads
from what it last knew, and catches up (queue mirror, registry, consumers) when they return.
"""

from __future__ import annotations

import logging
from typing import Any

from vramancer._version import __version__
from vramancer.clock import Clock
from vramancer.devices.ids import DeviceId
from vramancer.observability.metrics import Metrics
from vramancer.pool.connection import PoolConnection
from vramancer.pool.messages import LogsRequest
from vramancer.pool.metrics import PoolCollector
from vramancer.pool.poolqueue import PoolQueue
from vramancer.pool.registry import Heartbeat, NodeInfo, NodeState, Registry, node_info, node_state
from vramancer.pool.scheduler import PoolScheduler
from vramancer.pool.settings import NatsSettings
from vramancer.pool.worker import PoolWorker
from vramancer.tasks.model import LEASED_STATES, Change
from vramancer.tasks.ports import ArbiterPort, DevicesPort
from vramancer.tasks.service import TaskService
from vramancer.tasks.settings import TasksSettings
from vramancer.tasks.telemetry import Telemetry

log = logging.getLogger(__name__)


class PoolNode:
    """See the module docstring. Build, give it the task service (``attach``), then start."""

    def __init__(
        self,
        settings: NatsSettings,
        tasks_settings: TasksSettings,
        *,
        node: str,
        orchestrator: bool,
        clock: Clock,
        estimate_alpha: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.tasks_settings = tasks_settings
        self.node = node
        self.orchestrator = orchestrator
        self.clock = clock
        self.conn = PoolConnection(settings, name=f"vramancer-{node}")
        self.registry = Registry(self.conn, settings, clock)
        self.queue = PoolQueue(
            lambda: self.conn.js,
            replicas=settings.replicas,
            estimate_alpha=estimate_alpha,
            clock_time=clock.time,
        )
        self.scheduler: PoolScheduler | None = None
        if orchestrator:
            self.scheduler = PoolScheduler(
                self.conn,
                self.registry,
                self.queue,
                settings,
                node=node,
                lease_ttl_s=settings.leader_lease_s,
                task_lease_s=tasks_settings.lease_s,
                clock=clock,
            )
        if orchestrator and metrics is not None:
            metrics.registry.register(
                PoolCollector(
                    self.registry.nodes,
                    lambda info, now: node_state(
                        info,
                        now,
                        stale_after_s=settings.stale_after_s,
                        down_after_s=settings.down_after_s,
                    ),
                    clock.time,
                )
            )
        self.worker: PoolWorker | None = None
        self.heartbeat: Heartbeat | None = None
        self._tasks: TaskService | None = None
        self._devices: DevicesPort | None = None
        self._arbiter: ArbiterPort | None = None
        self._started_at = clock.time()
        #: This node's fastpath ``host:port`` to announce (set by the runtime), or None.
        self.fastpath_address: str | None = None

    def attach(self, tasks: TaskService, devices: DevicesPort, arbiter: ArbiterPort) -> None:
        """Give the node the task service whose workers run its tasks, its devices and its
        arbiter (what it announces)."""
        self._tasks, self._devices, self._arbiter = tasks, devices, arbiter
        tasks.workers.retry_unavailable = True
        if self.orchestrator:
            # Every change of the pool counts here once, as the shared bucket reports it.
            telemetry = tasks.telemetry
            telemetry.follow_store = True
            self.queue.follow(
                lambda change: self._heard(telemetry, change),
                lambda gone: telemetry.purged([gone], observed=True),
                lambda: telemetry.reset(self.queue.store.mirror.count),
            )
        self.worker = PoolWorker(
            self.conn,
            node=self.node,
            queue=self.queue,
            workers=tasks.workers,
            snapshot=devices.snapshot,
            logs=self._local_logs,
            settings=self.settings,
            lease_s=self.tasks_settings.lease_s,
            slots_per_device=self.tasks_settings.slots_per_device,
            clock=self.clock,
        )
        self.heartbeat = Heartbeat(self.registry, self.info, self.settings.heartbeat_s)

    def _heard(self, telemetry: Telemetry, change: Change) -> None:
        """A change of the pool: count it; a task that left a node or became ready may let
        the dispatcher start another at once (not at its next interval)."""
        telemetry.publish([change], observed=True)
        if self._tasks is not None and change.state not in LEASED_STATES:
            self._tasks.wake()

    def info(self) -> NodeInfo:
        """This node as the registry shows it (what the heartbeat announces)."""
        assert self._devices is not None and self._arbiter is not None
        snapshot = self._devices.snapshot()
        arbiter = self._arbiter
        grantable = {
            str(DeviceId.gpu(g.index)): arbiter.headroom(DeviceId.gpu(g.index))
            for g in snapshot.gpus
        }
        running = len(self._tasks.workers.active) if self._tasks is not None else 0
        return node_info(
            self.node,
            snapshot,
            grantable=grantable,
            running_tasks=running,
            now=self.clock.time(),
            started_at=self._started_at,
            slots_per_device=self.tasks_settings.slots_per_device,
            host_slots=self.tasks_settings.host_slots,
            version=__version__,
            orchestrator=self.orchestrator,
            fastpath=self.fastpath_address,
        )

    def fastpath_peers(self) -> list[str]:
        """The fastpath addresses the other live nodes announce."""
        return [
            info.fastpath
            for info in self.registry.nodes()
            if info.fastpath is not None
            and info.name != self.node
            and self.registry.state(info.name) is not NodeState.DOWN
        ]

    async def _local_logs(self, request: LogsRequest) -> dict[str, Any]:
        assert self._tasks is not None
        return await self._tasks.logs(
            request.task_id,
            request.max_bytes,
            stdout_offset=request.stdout_offset,
            stderr_offset=request.stderr_offset,
            attempt=request.attempt,
        )

    async def _resync(self) -> None:
        """After a (re)connection: reload the queue's copy (writes may have been missed; the
        changes missed reach the counts as one step each)."""
        await self.queue.resync()

    # --------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect (in the background), keep the registry's mirror; before the task service."""
        self.conn.on_connect(self._resync)
        await self.conn.start()
        await self.conn.wait_connected(self.settings.connect_timeout_s)
        if not self.conn.connected:
            log.warning(
                "nats: disconnected (%s): starting anyway; submissions are refused until the "
                "servers answer",
                self.conn.last_error or "no answer",
            )
        await self.registry.start()

    async def start_work(self) -> None:
        """After the task service: announce this node, take work, compete to dispatch."""
        assert self.worker is not None and self.heartbeat is not None
        await self.heartbeat.start()
        await self.worker.start()
        if self.scheduler is not None:
            await self.scheduler.start()

    async def stop_work(self) -> None:
        """Before the task service stops: stop dispatching and taking work (what runs is then
        stopped and queued again by the task service)."""
        for part in (self.scheduler, self.worker):
            if part is not None:
                try:
                    await part.stop()
                except Exception:
                    log.exception("stopping %s failed", type(part).__name__)

    async def stop(self) -> None:
        """After the task service: the heartbeat (the node then ages to stale), the registry,
        the connection."""
        if self.heartbeat is not None:
            try:
                await self.heartbeat.stop()
            except Exception:
                log.exception("stopping the heartbeat failed")
        await self.registry.stop()
        await self.conn.stop()

    def status(self) -> dict[str, Any]:
        """``nats``: connected or not, and whether this node dispatches now."""
        return {
            "state": self.conn.state,
            "node": self.node,
            "orchestrator": self.orchestrator,
            "dispatching": self.scheduler.may_dispatch() if self.scheduler else False,
            "last_error": self.conn.last_error,
        }

"""``PoolScheduler``: the orchestrator's side of the pool (``tasks.ports.PoolPort``).

The task service plans a round over ``views()`` (every ``up`` node's GPUs from the registry,
with the tasks leased to them), leases each grant to its node in the shared queue, then calls
``launch``, which publishes the lease on the node's work subject (``vrm.work.NODE``, a
work-queue stream; ``Nats-Msg-Id`` = task and lease token, so a resend is one message). Only the
orchestrator holding the dispatch lease (``DispatchLease``, a compare-and-set key with a TTL)
dispatches; another takes over when it stops renewing. A task's logs are asked of the node that
ran it (``vrm.ctl.NODE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from vramancer.clock import Clock
from vramancer.errors import BackendUnavailable
from vramancer.pool.connection import NatsUnavailable, PoolConnection
from vramancer.pool.leader import DispatchLease
from vramancer.pool.messages import Dispatch, LogsRequest
from vramancer.pool.registry import Registry
from vramancer.pool.settings import NatsSettings
from vramancer.pool.subjects import WORK_STREAM, control_subject, work_subject
from vramancer.pool.views import PoolGpu, node_problem, pool_gpus, pool_views
from vramancer.tasks.model import TaskRecord
from vramancer.tasks.picker import DeviceView

log = logging.getLogger(__name__)

#: Seconds a node has to answer a logs request.
LOGS_TIMEOUT_S = 5.0


class LeasedSource(Protocol):
    def leased(self) -> list[TaskRecord]:
        """Every task that holds a lease now (scheduled, running), from the queue's mirror."""
        ...


class PoolScheduler:
    """See the module docstring."""

    def __init__(
        self,
        conn: PoolConnection,
        registry: Registry,
        queue: LeasedSource,
        settings: NatsSettings,
        *,
        node: str,
        lease_ttl_s: float,
        task_lease_s: float,
        clock: Clock,
    ) -> None:
        self.node = node
        self.conn = conn
        self.registry = registry
        self.queue = queue
        self.settings = settings
        self.clock = clock
        self.lease = DispatchLease(conn, holder=node, ttl_s=lease_ttl_s, clock=clock)
        self.task_lease_s = task_lease_s
        self._loop: asyncio.Task[None] | None = None
        #: When the connection last came up (monotonic); None: not since start.
        self._connected_at: float | None = None

    # --------------------------------------------------------------------- PoolPort

    def views(self, now: float) -> list[DeviceView]:
        s = self.settings
        return pool_views(
            self.registry.nodes(),
            self.queue.leased(),
            now,
            stale_after_s=s.stale_after_s,
            down_after_s=s.down_after_s,
        )

    def may_dispatch(self) -> bool:
        return self.conn.connected and self.lease.held

    def may_take_back(self) -> bool:
        since = self._connected_at
        return (
            self.may_dispatch()
            and since is not None
            and self.clock.monotonic() - since >= self.task_lease_s
        )

    async def _connected(self) -> None:
        self._connected_at = self.clock.monotonic()

    async def launch(self, record: TaskRecord) -> bool:
        if record.node is None or record.device is None:
            log.error("task %s was leased without a node; not sent", record.task_id)
            return False
        message = Dispatch(record.task_id, record.lease_token, record.device)
        try:
            await self.conn.js.publish(
                work_subject(record.node),
                message.encode(),
                stream=WORK_STREAM,
                headers={"Nats-Msg-Id": message.msg_id},
            )
        except Exception as exc:
            log.warning(
                "task %s: could not send it to node %s (%s); its lease will run out and it "
                "is queued again",
                record.task_id,
                record.node,
                exc,
            )
            return False
        return True

    def gpus(self) -> Sequence[PoolGpu]:
        """The live nodes' GPUs; while NATS cannot be reached, ``NatsUnavailable`` (503): what
        the registry last said may be stale, and nothing could be queued anyway."""
        if not self.conn.connected:
            raise NatsUnavailable(
                f"the pool's NATS servers cannot be reached ({self.conn.last_error or 'no answer'})"
            )
        s = self.settings
        return pool_gpus(
            self.registry.nodes(),
            self.clock.time(),
            stale_after_s=s.stale_after_s,
            down_after_s=s.down_after_s,
        )

    def node_problem(self, node: str) -> str | None:
        s = self.settings
        return node_problem(
            self.registry.nodes(),
            node,
            self.clock.time(),
            stale_after_s=s.stale_after_s,
            down_after_s=s.down_after_s,
        )

    async def logs(self, record: TaskRecord, query: Mapping[str, Any]) -> dict[str, Any]:
        assert record.node is not None
        request = LogsRequest(record.task_id, **query)
        try:
            reply = await self.conn.nc.request(
                control_subject(record.node), request.encode(), timeout=LOGS_TIMEOUT_S
            )
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise BackendUnavailable(
                f"node {record.node}, which ran task {record.task_id}, does not answer for its "
                f"logs ({type(exc).__name__})"
            ) from None
        body: dict[str, Any] = json.loads(reply.data)
        error = body.get("error")
        if isinstance(error, dict):
            raise BackendUnavailable(f"node {record.node}: {error.get('message')}")
        return body

    # --------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.conn.on_connect(self._connected)
        self._loop = asyncio.create_task(self._keep_lease(), name="pool-dispatch-lease")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        with contextlib.suppress(Exception):
            await self.lease.release()

    async def _keep_lease(self) -> None:
        period = max(0.05, self.settings.leader_lease_s / 3)
        while True:
            try:
                if self.conn.connected:
                    await self.lease.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the dispatch lease could not be renewed")
            await asyncio.sleep(period)

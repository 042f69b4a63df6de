"""``PoolWorker``: a node's side of the pool — it runs the tasks handed to its GPUs.

It pulls from its own durable consumer on ``vrm.work.NODE`` (re-created after every reconnect:
a pull subscription stops after a server restart otherwise) and runs each task exactly as the
embedded runner does (``tasks.workers.Workers``: process group, timeout kill,
``CUDA_VISIBLE_DEVICES``, scratch directory, bounded logs, VRAM reserved in this node's arbiter,
a named model held). The message is acknowledged only once the task has ended; while it runs the
worker sends ``in_progress`` (AckWait is ``[tasks] lease_s``) and renews the task's lease in the
shared queue.

Fencing: a message is run only when the queue still shows its task ``scheduled`` on this node
under the message's lease token; a message of an older lease (a redelivery after this node was
cut off and the task was given to another) is acknowledged and dropped. A late outcome of a lost
lease writes nothing (``finish`` checks the token). Each tick the worker compares its running
tasks with the queue: a cancel request stops the process; a lease taken back stops it too.

Retries are re-placed by the dispatcher (another node may fit better): a failed attempt goes
back through the queue's back-off, not through a JetStream redelivery. ``nak`` with a delay is
for a message this node cannot look at now (the queue unreachable, the task not visible yet);
``term`` for poison; after ``[nats] max_deliver`` deliveries the message goes to the
dead-letter subject ``vrm.dead.NODE`` and is terminated (a work-queue stream would keep it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from vramancer.clock import Clock
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import SystemSnapshot
from vramancer.errors import VramancerError
from vramancer.pool.connection import PoolConnection
from vramancer.pool.messages import BadMessage, Dispatch, LogsRequest
from vramancer.pool.settings import NatsSettings
from vramancer.pool.subjects import (
    DEAD_STREAM,
    WORK_STREAM,
    control_subject,
    dead_subject,
    work_subject,
    worker_durable,
)
from vramancer.tasks.model import TaskRecord, TaskState
from vramancer.tasks.workers import Workers

log = logging.getLogger(__name__)

#: Seconds a message waits before it is offered again after a ``nak`` (queue unreachable).
NAK_DELAY_S = 1.0


class SharedQueue(Protocol):
    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def fresh(self, task_id: str) -> TaskRecord | None: ...

    async def renew(
        self, leases: Sequence[tuple[str, int]], *, now: float, lease_s: float
    ) -> int: ...


@dataclass
class Held:
    """A dispatch message this node is running: acknowledged when its task ends."""

    msg: Any
    lease_token: int


class PoolWorker:
    """See the module docstring."""

    def __init__(
        self,
        conn: PoolConnection,
        *,
        node: str,
        queue: SharedQueue,
        workers: Workers,
        snapshot: Callable[[], SystemSnapshot],
        logs: Callable[[LogsRequest], Awaitable[dict[str, Any]]],
        settings: NatsSettings,
        lease_s: float,
        slots_per_device: int,
        clock: Clock,
    ) -> None:
        self.conn = conn
        self.node = node
        self.queue = queue
        self.workers = workers
        self.snapshot = snapshot
        self.read_logs = logs
        self.settings = settings
        self.lease_s = lease_s
        self.slots_per_device = slots_per_device
        self.clock = clock
        self.held: dict[str, Held] = {}
        self._psub: Any = None
        self._ctl: Any = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        #: Set when one of this node's running tasks frees its slot.
        self._slot_free = asyncio.Event()
        workers.on_slot_free.append(self._slot_free.set)

    # --------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._stopping = False
        self.conn.on_connect(self._subscribe)
        self._loops = [
            asyncio.create_task(self._pull_loop(), name="pool-worker-pull"),
            asyncio.create_task(self._tick_loop(), name="pool-worker-tick"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        for sub in (self._psub, self._ctl):
            with contextlib.suppress(Exception):
                if sub is not None:
                    await sub.unsubscribe()
        self._psub = self._ctl = None

    async def _subscribe(self) -> None:
        """(Re)create the pull consumer and the control subscription (after every connect)."""
        for sub in (self._psub, self._ctl):
            with contextlib.suppress(Exception):
                if sub is not None:
                    await sub.unsubscribe()
        config = ConsumerConfig(
            durable_name=worker_durable(self.node),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.lease_s,
            max_deliver=-1,
            filter_subject=work_subject(self.node),
        )
        self._psub = await self.conn.js.pull_subscribe(
            work_subject(self.node),
            durable=worker_durable(self.node),
            stream=WORK_STREAM,
            config=config,
        )
        self._ctl = await self.conn.nc.subscribe(control_subject(self.node), cb=self._on_control)

    # --------------------------------------------------------------------- pulling

    def free_slots(self) -> int:
        gpus = len(self.snapshot().gpus)
        return max(0, gpus * self.slots_per_device - len(self.workers.active))

    async def _pull_loop(self) -> None:
        while not self._stopping:
            self._slot_free.clear()
            psub, free = self._psub, self.free_slots()
            if psub is None or free == 0 or not self.conn.connected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), 0.1)
                continue
            try:
                msgs = await psub.fetch(free, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # nats' TimeoutError when nothing came; a reconnect
                await asyncio.sleep(0.05)
                continue
            for msg in msgs:
                await self._take(msg)

    async def _take(self, msg: Any) -> None:
        try:
            dispatch = Dispatch.decode(msg.data)
        except BadMessage as exc:
            log.error("poison message on %s terminated: %s", msg.subject, exc)
            await msg.term()
            return
        if msg.metadata.num_delivered > self.settings.max_deliver:
            await self._dead_letter(msg, dispatch, "delivered too many times")
            return
        try:
            record = await self.queue.get(dispatch.task_id)
            if record is None or record.lease_token < dispatch.lease_token:
                # The lease is written before the message: this copy has not heard of it yet.
                record = await self.queue.fresh(dispatch.task_id)
        except VramancerError:
            await msg.nak(delay=NAK_DELAY_S)
            return
        if record is None:
            await msg.nak(delay=NAK_DELAY_S)
            return
        if not self._current(record, dispatch.lease_token, TaskState.SCHEDULED):
            await msg.ack()  # an older lease's message: the task went elsewhere or ended
            return
        await self._launch(msg, record, dispatch)

    def _current(self, record: TaskRecord, token: int, *states: TaskState) -> bool:
        return (
            record.lease_token == token
            and record.node == self.node
            and (record.state in states if states else not record.state.terminal)
        )

    async def _launch(self, msg: Any, record: TaskRecord, dispatch: Dispatch) -> None:
        device = DeviceId.parse(dispatch.device)
        gpu = self.snapshot().gpu(device.index) if device.index is not None else None
        if gpu is None:
            await self._dead_letter(msg, dispatch, f"this node has no {device.local()}")
            return
        local = replace(record, device=str(device.local()))
        cuda = None if gpu.simulated else gpu.cuda_index
        self.held[record.task_id] = Held(msg, dispatch.lease_token)
        if not await self.workers.launch(local, cuda):
            self.held.pop(record.task_id, None)
            await msg.ack()  # went back to the queue (no room after all) or failed to start

    async def _dead_letter(self, msg: Any, dispatch: Dispatch, why: str) -> None:
        log.error("task %s: dispatch message dead-lettered: %s", dispatch.task_id, why)
        with contextlib.suppress(Exception):
            await self.conn.js.publish(
                dead_subject(self.node),
                msg.data,
                stream=DEAD_STREAM,
                headers={"Vrm-Reason": why[:200], "Nats-Msg-Id": dispatch.msg_id + ".dead"},
            )
        await msg.term()

    # --------------------------------------------------------------------- running

    async def _tick_loop(self) -> None:
        period = max(0.05, min(1.0, self.lease_s / 3))
        while not self._stopping:
            await asyncio.sleep(period)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pool worker tick failed")

    async def tick(self) -> None:
        """Acknowledge ended tasks, keep running ones alive, stop cancelled or lost ones."""
        alive: list[tuple[str, int]] = []
        for task_id, held in list(self.held.items()):
            if task_id in self.workers.recording:
                alive.append((task_id, held.lease_token))  # ended; its outcome is on its way
                continue
            if task_id not in self.workers.active:
                del self.held[task_id]  # its outcome is recorded (or fenced): done with it
                with contextlib.suppress(Exception):
                    await held.msg.ack()
                continue
            with contextlib.suppress(Exception):
                await held.msg.in_progress()
            record = await self.queue.get(task_id)
            if record is None or not self._current(record, held.lease_token):
                self.workers.lost(task_id)
            elif record.cancel_requested:
                self.workers.cancel(task_id)
            else:
                alive.append((task_id, held.lease_token))
        if alive and self.conn.connected:
            with contextlib.suppress(VramancerError):
                await self.queue.renew(alive, now=self.clock.time(), lease_s=self.lease_s)

    # --------------------------------------------------------------------- control

    async def _on_control(self, msg: Any) -> None:
        try:
            request = LogsRequest.decode(msg.data)
            body = await self.read_logs(request)
        except (BadMessage, VramancerError) as exc:
            code = getattr(exc, "code", "bad_request")
            body = {"error": {"code": code, "message": str(exc)}}
        except Exception as exc:
            log.exception("control request failed")
            body = {"error": {"code": "internal", "message": type(exc).__name__}}
        with contextlib.suppress(Exception):
            await msg.respond(json.dumps(body, default=str).encode())

"""The maintenance lane: ``warmup``, ``compress``, ``noop`` and ``rebalance`` tasks, run in the
daemon's own process against the memory store, in idle windows, never ahead of a user task.

* idle window: no user task queued or running, no GPU busier than ``idle_busy_ratio``, the host
  CPU not busier than ``maintenance_max_cpu_ratio``, all of that for ``maintenance_idle_s``;
  then a batch of up to ``maintenance_batch`` ready maintenance tasks is leased and run one by
  one, and the rest of the batch is handed back, untouched, as soon as a user task arrives;
* deadline: a maintenance task that has waited ``maintenance_max_wait_s`` runs anyway (no
  window must starve it; 0 turns this off), and then no longer yields to users;
* the daemon's own maintenance (``auto_maintenance``): every ``auto_maintenance_interval_s``,
  when the machine is idle, the store's upkeep (``AUTO_MAINTENANCE``) is queued as tasks owned
  by ``system``, skipping a kind that still has one not ended.

One batch runs at a time; its outcomes are reported together (one commit).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from vramancer.clock import Clock
from vramancer.devices.types import SystemSnapshot
from vramancer.tasks.model import (
    LEASED_STATES,
    READY_STATES,
    SYSTEM_OWNER,
    Grant,
    Outcome,
    OutcomeKind,
    Submitted,
    TaskRecord,
    TaskSpec,
    TaskType,
)
from vramancer.tasks.picker import HOST
from vramancer.tasks.ports import MemoryPort
from vramancer.tasks.queue import TaskQueue
from vramancer.tasks.settings import TasksSettings
from vramancer.tasks.telemetry import Telemetry

log = logging.getLogger(__name__)

#: The daemon's own maintenance (``[tasks] auto_maintenance``): one task of each kind at most.
AUTO_MAINTENANCE = (TaskType.WARMUP, TaskType.COMPRESS, TaskType.REBALANCE)

#: Queues tasks as an owner: ``submit(specs, owner)``.
Submit = Callable[[Sequence[TaskSpec], str], Awaitable[list[Submitted]]]


class MaintenanceLane:
    """See the module docstring."""

    def __init__(
        self,
        settings: TasksSettings,
        *,
        idle_busy_ratio: float,
        snapshot: Callable[[], SystemSnapshot],
        memory: MemoryPort,
        queue: TaskQueue,
        clock: Clock,
        telemetry: Telemetry,
        worker_id: str,
        backoff: Callable[[int], float],
        submit: Submit,
        poke: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.idle_busy_ratio = idle_busy_ratio
        #: The latest device snapshot (``DevicesPort.snapshot``).
        self.snapshot = snapshot
        self.memory = memory
        self.queue = queue
        self.clock = clock
        self.telemetry = telemetry
        self.worker_id = worker_id
        self.backoff = backoff
        self.submit = submit
        self.poke = poke
        #: The batch running now.
        self.running: asyncio.Task[None] | None = None
        #: The daemon stops: hand every task not started back.
        self.stopping = False
        self._idle_since: float | None = None
        #: Why the last look found no idle window ("" when it was idle).
        self._not_idle = ""
        self._next_auto = -math.inf

    # -------------------------------------------------------------------------- idle window

    def busy_reason(self, snapshot: SystemSnapshot) -> str:
        """Why the machine is not idle for maintenance now ("" when it is): a user task
        waiting or running, a GPU busier than ``idle_busy_ratio``, the host CPU busier than
        ``maintenance_max_cpu_ratio``."""
        users = self.telemetry.lane_count(False, (*READY_STATES, *LEASED_STATES))
        if users:
            return f"{users} user task(s) queued or running"
        idle_ratio = self.idle_busy_ratio
        for g in snapshot.gpus:
            if g.utilization_ratio is not None and g.utilization_ratio > idle_ratio:
                return (
                    f"GPU {g.index} {g.utilization_ratio:.0%} busy > idle_busy_ratio "
                    f"{idle_ratio:.0%}"
                )
        cpu_limit = self.settings.maintenance_max_cpu_ratio
        cpu = snapshot.host.cpu_utilization_ratio
        if cpu_limit < 1.0 and cpu > cpu_limit:
            return f"CPU {cpu:.0%} > maintenance_max_cpu_ratio {cpu_limit:.0%}"
        return ""

    def allowed(self, snapshot: SystemSnapshot) -> bool:
        """Idle (``busy_reason``) for ``maintenance_idle_s``; ``_not_idle`` says why not."""
        mono = self.clock.monotonic()
        reason = self.busy_reason(snapshot)
        if reason:
            self._idle_since = None
            self._not_idle = reason
            return False
        if self._idle_since is None:
            self._idle_since = mono
        idle_for = mono - self._idle_since
        needed = self.settings.maintenance_idle_s
        self._not_idle = (
            ""
            if idle_for >= needed
            else (f"idle for {idle_for:.1f} s of maintenance_idle_s {needed:g} s")
        )
        return not self._not_idle

    def window(self) -> dict[str, Any]:
        """What maintenance waits for now: ``waiting`` (ready maintenance tasks), ``idle``
        (the machine is idle for maintenance), ``reason`` (why not, "" when idle) and
        ``max_wait_s`` (after which a waiting one runs anyway)."""
        reason = self.busy_reason(self.snapshot())
        if not reason and self._idle_since is not None:
            reason = self._not_idle
        return {
            "waiting": self.telemetry.lane_count(True, READY_STATES),
            "idle": not reason,
            "reason": reason,
            "max_wait_s": self.settings.maintenance_max_wait_s,
            "auto_maintenance": self.settings.auto_maintenance,
        }

    # -------------------------------------------------------------------------- dispatch

    async def dispatch(self, now: float) -> int:
        """Lease ready maintenance tasks: all of a batch in an idle window; otherwise only
        those that waited ``maintenance_max_wait_s`` (they then no longer yield to users)."""
        if self.running is not None or not self.telemetry.lane_count(True, READY_STATES):
            return 0
        s = self.settings
        overdue = not self.allowed(self.snapshot())
        if not overdue:
            candidates = await self.queue.ready(maintenance=True, limit=s.maintenance_batch)
        elif s.maintenance_max_wait_s > 0:
            candidates = await self.queue.overdue_maintenance(
                ready_before=now - s.maintenance_max_wait_s, limit=s.maintenance_batch
            )
        else:
            return 0
        grants = [Grant(r.task_id, HOST, running=True, previous=r.state) for r in candidates]
        leased, changes = await self.queue.lease(
            grants, worker=self.worker_id, now=now, lease_s=s.lease_s
        )
        self.telemetry.publish(changes)
        if leased:
            if overdue:
                log.info(
                    "running %d maintenance task(s) that waited over maintenance_max_wait_s (%s)",
                    len(leased),
                    self._not_idle,
                )
            self.running = asyncio.create_task(self.run(leased, yield_to_users=not overdue))
        return len(leased)

    async def queue_upkeep(self) -> int:
        """``auto_maintenance``: every ``auto_maintenance_interval_s``, when the machine is idle,
        queue the store's upkeep (``AUTO_MAINTENANCE``) as system-owned tasks, skipping a kind
        that still has one not ended. Returns how many were queued."""
        s = self.settings
        mono = self.clock.monotonic()
        if not s.auto_maintenance or mono < self._next_auto:
            return 0
        if math.isinf(self._next_auto):  # the first round comes one interval after start
            self._next_auto = mono + s.auto_maintenance_interval_s
            return 0
        if self.busy_reason(self.snapshot()):
            return 0  # look again next round
        self._next_auto = mono + s.auto_maintenance_interval_s
        pending = await self.queue.open_tasks(SYSTEM_OWNER, limit=64)
        have = {record.type for record in pending}
        specs = [TaskSpec(type=kind) for kind in AUTO_MAINTENANCE if kind not in have]
        if not specs:
            return 0
        await self.submit(specs, SYSTEM_OWNER)
        return len(specs)

    # -------------------------------------------------------------------------- running

    async def run(self, records: list[TaskRecord], *, yield_to_users: bool = True) -> None:
        """Run a leased batch one by one; report every outcome in one commit."""
        outcomes: list[Outcome] = []
        try:
            for record in records:
                users = self.telemetry.lane_count(False, READY_STATES)
                if self.stopping or (yield_to_users and users):
                    # A user task arrived: hand the rest back, untouched.
                    outcomes.append(
                        record.outcome(OutcomeKind.RELEASED, error="yielded to user tasks")
                    )
                    continue
                outcomes.append(await self._maintain(record))
            changes = await self.queue.finish(
                outcomes, now=self.clock.time(), retry_delay=self.backoff
            )
            self.telemetry.publish(changes)
        except Exception:
            log.exception("maintenance batch failed")
        finally:
            self.running = None
            self.poke()

    async def _maintain(self, record: TaskRecord) -> Outcome:
        t0 = self.clock.monotonic()
        try:
            message = await self._job(record)
        except Exception as exc:
            return record.outcome(
                OutcomeKind.ERROR,
                error=f"{record.type} failed: {type(exc).__name__}: {exc}",
                run_s=self.clock.monotonic() - t0,
            )
        return record.outcome(
            OutcomeKind.OK, exit_code=0, stdout_tail=message, run_s=self.clock.monotonic() - t0
        )

    async def _job(self, record: TaskRecord) -> str:
        """Run one maintenance task against the memory store; what it did, in words."""
        if record.type is TaskType.NOOP:
            return ""
        if record.type is TaskType.REBALANCE:
            maintain = getattr(self.memory, "maintain", None)
            if maintain is None:
                return "nothing to rebalance"
            await _call(maintain)
            return "rebalanced"
        payload = record.spec.get("payload") or {}
        blocks = int(payload.get("max_blocks", self.settings.maintenance_max_blocks))
        if record.type is TaskType.WARMUP:
            done = await _call(self.memory.warmup, blocks)
            return f"warmed {done} block(s)"
        done = await _call(self.memory.compress_cold, blocks)
        return f"compressed {done} block(s)"


async def _call(fn: Any, *args: Any) -> Any:
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        result = await result
    return result

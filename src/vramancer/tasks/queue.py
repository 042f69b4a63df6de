"""The task queue interface. The embedded default is SQLite (``sqlite_queue.SqliteQueue``); a
distributed one (NATS JetStream work queue) implements the same Protocol.

Semantics every implementation keeps (what becomes of a task after an outcome, a lost lease,
a back-off, a cancel, a lease, the ``running`` mark or a wait for a GPU is decided by
``transitions.next_state``, or ``transitions.step`` for the triggers that do not read a task's
counts; a queue persists the ``Transition`` it returns, under its own lease-token check):

* ``submit`` is acknowledged only once durable; an idempotency key (or a given ``task_id``) that
  is already known returns the existing task (``created=False``) and stores nothing new when
  that task has the same owner; another owner's key or id refuses the whole submission
  (``IdempotencyKeyTaken``, ``TaskIdTaken``): a caller never gets another caller's task.
  ``max_open_maintenance`` refuses it (``QuotaExceeded``) when the owner would then have more
  maintenance tasks not yet ended; the check and the insert are one transaction.
* ``lease`` hands a ready task to one worker with a fresh ``lease_token``; the worker heartbeats
  the lease; a lease not renewed before ``lease_expires`` is taken back (``expire_leases``) and
  the task is queued again: execution is at-least-once. A task whose lease was lost
  ``max_lease_losses`` times ends ``failed`` (it keeps killing its worker: no crash loop).
* ``finish`` applies an attempt's outcome only when its ``lease_token`` is the task's current
  one and the task is still leased, so a late or repeated report changes nothing: a task moves
  to ``done`` at most once.
* Every mutation returns the committed ``Change`` records, in order, for events and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vramancer.tasks.model import (
    Change,
    Grant,
    HistoryPage,
    NewTask,
    Outcome,
    Submitted,
    TaskRecord,
    TaskState,
)


@dataclass(frozen=True, slots=True)
class Orphan:
    """A process a lost lease left behind (pid and its start time, to avoid killing a reuse)."""

    task_id: str
    pid: int
    pid_started: float | None


@dataclass(frozen=True, slots=True)
class Purged:
    """A task deleted by the retention purge (its log files go too)."""

    task_id: str
    attempts: int
    maintenance: bool
    state: TaskState


class TaskQueue(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(
        self, tasks: Sequence[NewTask], now: float, *, max_open_maintenance: int | None = None
    ) -> tuple[list[Submitted], list[Change]]: ...

    async def open_tasks(self, owner: str, *, limit: int) -> list[TaskRecord]:
        """Up to ``limit`` tasks of ``owner`` that have not ended, oldest first."""
        ...

    async def overdue_maintenance(self, *, ready_before: float, limit: int) -> list[TaskRecord]:
        """Ready maintenance tasks ready at ``ready_before`` or earlier, longest waiting first."""
        ...

    async def ready(self, *, maintenance: bool, limit: int, offset: int = 0) -> list[TaskRecord]:
        """Ready tasks (queued, waiting_gpu) of one lane in dispatch order, from ``offset``."""
        ...

    async def lease(
        self, grants: Sequence[Grant], *, worker: str, now: float, lease_s: float
    ) -> tuple[list[TaskRecord], list[Change]]: ...

    async def mark_running(
        self,
        task_id: str,
        lease_token: int,
        *,
        pid: int | None,
        pid_started: float | None,
        now: float,
    ) -> list[Change]: ...

    async def set_waiting(
        self, reasons: Sequence[tuple[str, str, TaskState]], now: float
    ) -> list[Change]:
        """Mark tasks ``waiting_gpu`` with a reason: ``(task_id, reason, state it was read in)``;
        a task read as waiting only gets its reason updated (no change reported)."""
        ...

    async def dispatch_view(
        self, *, limit: int, overdue_before: float | None, overdue_limit: int
    ) -> tuple[list[TaskRecord], list[TaskRecord]]:
        """In one read: the first ``limit`` ready user tasks in dispatch order, and the ready
        user tasks ready at ``overdue_before`` or earlier (aging; none when None), longest
        waiting first."""
        ...

    async def purge(self, *, ended_before: float, limit: int) -> list[Purged]:
        """Delete up to ``limit`` tasks that ended before ``ended_before`` (retention)."""
        ...

    async def heartbeat(self, worker: str, *, now: float, lease_s: float) -> int: ...

    async def finish(
        self, outcomes: Sequence[Outcome], *, now: float, retry_delay: Callable[[int], float]
    ) -> list[Change]: ...

    async def cancel(self, task_id: str, now: float) -> tuple[TaskRecord | None, list[Change]]: ...

    async def promote_due(self, now: float) -> list[Change]: ...

    async def expire_leases(
        self, now: float, *, all_leases: bool = False, max_lease_losses: int = ...
    ) -> tuple[list[Change], list[Orphan]]: ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def ids_with_prefix(self, prefix: str, *, limit: int) -> list[str]:
        """Up to ``limit`` ids of tasks that start with ``prefix``, in id order (``task_ids``)."""
        ...

    async def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        """The state of each known task among ``task_ids`` (unknown ones are left out)."""
        ...

    async def history(
        self,
        *,
        state: TaskState | None,
        since: float | None,
        cursor: str | None,
        limit: int,
    ) -> HistoryPage: ...

    async def counts(self) -> dict[tuple[bool, TaskState], int]:
        """Tasks per (maintenance lane?, state)."""
        ...

    async def learned_durations(self) -> dict[str, float]: ...

"""The task queue interface. The embedded default is SQLite (``sqlite_queue.SqliteQueue``); a
distributed one (NATS JetStream work queue) implements the same Protocol.

Semantics every implementation keeps:

* ``submit`` is acknowledged only once durable; an idempotency key (or a given ``task_id``) that
  is already known returns the existing task (``created=False``) and stores nothing new.
* ``lease`` hands a ready task to one worker with a fresh ``lease_token``; the worker heartbeats
  the lease; a lease not renewed before ``lease_expires`` is taken back (``expire_leases``) and
  the task is queued again: execution is at-least-once.
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


class TaskQueue(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(
        self, tasks: Sequence[NewTask], now: float
    ) -> tuple[list[Submitted], list[Change]]: ...

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

    async def set_waiting(self, reasons: Sequence[tuple[str, str]], now: float) -> list[Change]: ...

    async def heartbeat(self, worker: str, *, now: float, lease_s: float) -> int: ...

    async def finish(
        self, outcomes: Sequence[Outcome], *, now: float, retry_delay: Callable[[int], float]
    ) -> list[Change]: ...

    async def cancel(self, task_id: str, now: float) -> tuple[TaskRecord | None, list[Change]]: ...

    async def promote_due(self, now: float) -> list[Change]: ...

    async def expire_leases(
        self, now: float, *, all_leases: bool = False
    ) -> tuple[list[Change], list[Orphan]]: ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

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

"""The pool's task queue on NATS JetStream: every orchestrator of the pool reads and writes the
same tasks, in the KV bucket ``vrm_tasks`` (``records``: one key per task, per idempotency key,
per learned run time).

Same ``TaskQueue`` as the embedded ``SqliteQueue``, same answers (``tasks/queue.py``):

* What becomes of a task is decided by ``tasks.transitions`` (``next_state``), from the task as
  read; the write is a compare-and-set on the key's revision, so two orchestrators never both
  apply a decision to one version of a task. A write that loses re-reads the task and decides
  again (a lease, whose grant was made on what the dispatcher saw, is skipped instead: a task
  is never leased twice).
* ``finish`` and the ``running`` mark are fenced by the lease token: a report from an attempt
  whose lease was lost (a worker cut off, then back) writes nothing.
* ``submit`` is durable once JetStream acknowledged a create-only write (``Nats-Expected-Last-
  Subject-Sequence: 0``, de-duplicated by ``Nats-Msg-Id``); ``seq`` is the revision of that
  create (monotonic across the bucket). Idempotency keys are keys of their own, created the
  same way before the tasks: the same owner's key returns its task, another owner's refuses
  the submission (what this call wrote is deleted again).
* Reads answer from an in-memory copy of the bucket (``mirror.TaskMirror``) kept current by a
  watcher and by this queue's own writes, so they cost the same at 100k tasks and answer while
  NATS is down. ``resync()`` (after every reconnect) rebuilds the copy from a new watcher.

The parts: ``jsstore`` (the bucket, the copy, the compare-and-set loop), ``jssubmit``
(submissions), ``records`` (the JSON of each key), ``mirror`` (the copy's indexes),
``kvbucket`` (the JetStream calls); this module decides, through ``transitions``, what each
other operation writes.

Not one transaction across tasks: a quota (``max_open_maintenance``) is counted on this
queue's copy, so two orchestrators submitting at the same instant may each pass it once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from vramancer.devices.ids import DeviceId
from vramancer.pool import jssubmit
from vramancer.pool import records as rec
from vramancer.pool.jsstore import CAS_TRIES, Decide, TaskStore, bounded
from vramancer.pool.kvbucket import DEFAULT_MAX_VALUE, Bucket
from vramancer.pool.records import Duration, StoredTask
from vramancer.tasks.model import (
    LEASED_STATES,
    Change,
    Grant,
    HistoryPage,
    NewTask,
    Outcome,
    OutcomeKind,
    Submitted,
    TaskRecord,
    TaskState,
)
from vramancer.tasks.queue import Orphan, Purged
from vramancer.tasks.settings import DEFAULT_MAX_LEASE_LOSSES
from vramancer.tasks.sqlite_apply import LEASES, releases_lease, transition_change
from vramancer.tasks.transitions import TaskFacts, Transition, Trigger, next_state, no_backoff

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

#: Seconds a deleted key's marker stays in the stream (every watcher has delivered it by then;
#: a stalled one restarts within seconds).
MARKER_KEEP_S = 600.0


def facts(r: TaskRecord) -> TaskFacts:
    """What the state machine reads of ``r``."""
    return TaskFacts(
        r.state, r.attempts, r.max_retries, r.lease_losses, r.cancel_requested, r.not_before
    )


def persist(s: StoredTask, t: Transition, now: float) -> StoredTask:
    """``s`` after ``t`` (what the embedded queue's ``APPLY_SQL`` writes): leaving the leased
    states gives the lease up; back to the queue untried forgets the device (and its node)."""
    r = s.record
    unleased = releases_lease(t)
    record = replace(
        r,
        state=t.state,
        attempts=t.attempts,
        lease_losses=t.lease_losses,
        cancel_requested=t.cancel_requested,
        not_before=t.not_before,
        ready_at=r.ready_at if t.ready_at is None else t.ready_at,
        finished_at=r.finished_at if t.finished_at is None else t.finished_at,
        device=None if t.clear_device else r.device,
        node=None if t.clear_device else r.node,
        error=r.error if t.reason is None else t.reason,
    )
    return replace(
        s,
        record=record,
        worker=None if unleased else s.worker,
        lease_expires=None if unleased else s.lease_expires,
        updated_at=now,
    )


def node_of(device: str) -> str | None:
    """The node of ``NODE/gpu:N``; None for a device of this node (or not a device name)."""
    try:
        return DeviceId.parse(device).node
    except ValueError:
        return None


class JetStreamQueue:
    """The ``TaskQueue`` of a pool (module docstring). ``js()`` gives the current JetStream
    context (it raises the connection's ``BackendUnavailable`` while NATS is down)."""

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        *,
        bucket: str = "vrm_tasks",
        replicas: int = 1,
        estimate_alpha: float = 0.3,
        clock_time: Callable[[], float] | None = None,
        max_value: int = DEFAULT_MAX_VALUE,
        marker_keep_s: float = MARKER_KEEP_S,
    ) -> None:
        self.store = TaskStore(
            js, bucket=bucket, replicas=replicas, clock_time=clock_time, max_value=max_value
        )
        self.estimate_alpha = estimate_alpha
        self.marker_keep_s = marker_keep_s

    @property
    def bucket(self) -> Bucket:
        return self.store.bucket

    @property
    def synced_at(self) -> float | None:
        """When the copy of the bucket was last loaded whole (None: never, or no clock)."""
        return self.store.synced_at

    async def open(self) -> None:
        """Create the bucket if missing and load every task."""
        await self.store.open()

    async def resync(self, *, retry_s: float = 0.0) -> None:
        """After a reconnect: watch the bucket anew and reload it (``TaskStore.resync``; the
        pool's connection runs it as an on-connect callback)."""
        await self.store.resync(retry_s=retry_s)

    async def close(self) -> None:
        await self.store.close()

    async def submit(
        self, tasks: Sequence[NewTask], now: float, *, max_open_maintenance: int | None = None
    ) -> tuple[list[Submitted], list[Change]]:
        return await jssubmit.submit(self.store, tasks, now, max_open_maintenance)

    # -- reads ---------------------------------------------------------------------------------

    async def open_tasks(self, owner: str, *, limit: int) -> list[TaskRecord]:
        return self.store.mirror.open_tasks(owner, limit)

    async def overdue_maintenance(self, *, ready_before: float, limit: int) -> list[TaskRecord]:
        return self.store.mirror.overdue(True, ready_before, limit)

    async def ready(self, *, maintenance: bool, limit: int, offset: int = 0) -> list[TaskRecord]:
        return self.store.mirror.ready_page(maintenance, limit, offset)

    async def dispatch_view(
        self, *, limit: int, overdue_before: float | None, overdue_limit: int
    ) -> tuple[list[TaskRecord], list[TaskRecord]]:
        page = self.store.mirror.ready_page(False, limit) if limit > 0 else []
        overdue = []
        if overdue_before is not None:
            overdue = self.store.mirror.overdue(False, overdue_before, overdue_limit)
        return page, overdue

    async def get(self, task_id: str) -> TaskRecord | None:
        stored = self.store.mirror.get(task_id)
        return None if stored is None else stored.record

    async def ids_with_prefix(self, prefix: str, *, limit: int) -> list[str]:
        return self.store.mirror.ids_with_prefix(prefix, limit)

    async def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        found = {}
        for task_id in task_ids:
            stored = self.store.mirror.get(task_id)
            if stored is not None:
                found[task_id] = stored.state
        return found

    async def history(
        self,
        *,
        state: TaskState | None,
        since: float | None,
        cursor: str | None,
        limit: int,
    ) -> HistoryPage:
        return self.store.mirror.history(state, since, cursor, limit)

    async def counts(self) -> dict[tuple[bool, TaskState], int]:
        return dict(self.store.mirror.count)

    async def learned_durations(self) -> dict[str, float]:
        return {d.key: d.mean_s for d, _ in self.store.mirror.durations.values()}

    # -- dispatch ------------------------------------------------------------------------------

    async def lease(
        self, grants: Sequence[Grant], *, worker: str, now: float, lease_s: float
    ) -> tuple[list[TaskRecord], list[Change]]:
        """Lease each granted task still ready; a grant whose task changed since it was read
        (another orchestrator wrote it first) is skipped, never leased twice."""

        def decide(grant: Grant) -> Decide[tuple[TaskRecord, Change]]:
            def lease_one(s: StoredTask) -> tuple[StoredTask, tuple[TaskRecord, Change]] | None:
                r = s.record
                t = next_state(facts(r), LEASES[grant.running], now, no_backoff)
                if t.ignored:
                    return None
                leased = replace(
                    s,
                    record=replace(
                        r,
                        state=t.state,
                        attempts=t.attempts,
                        not_before=t.not_before,
                        started_at=t.started_at,
                        lease_token=r.lease_token + 1,
                        device=grant.device,
                        node=node_of(grant.device),
                        scheduled_at=now,
                        exit_code=None,
                        error=None,
                        pid=None,
                    ),
                    worker=worker,
                    lease_expires=now + lease_s,
                    pid_started=None,
                    updated_at=now,
                )
                wait = max(0.0, now - (r.ready_at or now)) if t.started_at else None
                change = Change(
                    r.task_id,
                    grant.previous,
                    t.state,
                    t.attempts,
                    grant.device,
                    wait_s=wait,
                    type=r.type,
                )
                return leased, (leased.record, change)

            return lease_one

        done = await self.store.each(((g.task_id, decide(g)) for g in grants), retry=False)
        return [record for record, _ in done], [change for _, change in done]

    async def mark_running(
        self,
        task_id: str,
        lease_token: int,
        *,
        pid: int | None,
        pid_started: float | None,
        now: float,
    ) -> list[Change]:
        def start(s: StoredTask) -> tuple[StoredTask, Change] | None:
            r = s.record
            if r.lease_token != lease_token:
                return None
            t = next_state(facts(r), Trigger.START, now, no_backoff)
            if t.ignored:
                return None
            started = replace(
                s,
                record=replace(
                    r,
                    state=t.state,
                    attempts=t.attempts,
                    started_at=r.started_at if t.started_at is None else t.started_at,
                    pid=pid,
                ),
                pid_started=pid_started,
                updated_at=now,
            )
            wait = max(0.0, now - (r.ready_at or now))
            change = Change(
                task_id, t.previous, t.state, t.attempts, r.device, wait_s=wait, type=r.type
            )
            return started, change

        change = await self.store.change(task_id, start)
        return [] if change is None else [change]

    async def set_waiting(
        self, reasons: Sequence[tuple[str, str, TaskState]], now: float
    ) -> list[Change]:
        def wait(why: str, seen: TaskState) -> Decide[Change | None]:
            def decide(s: StoredTask) -> tuple[StoredTask, Change | None] | None:
                r = s.record
                if r.state is not seen or r.error == why:
                    return None
                t = next_state(facts(r), Trigger.WAIT, now, no_backoff)
                if t.ignored:
                    return None
                waiting = replace(
                    s,
                    record=replace(r, state=t.state, attempts=t.attempts, error=why),
                    updated_at=now,
                )
                change = (
                    Change(r.task_id, t.previous, t.state, t.attempts, error=why, type=r.type)
                    if t.changed
                    else None
                )
                return waiting, change

            return decide

        done = await self.store.each((task_id, wait(why, seen)) for task_id, why, seen in reasons)
        return [change for change in done if change is not None]

    async def heartbeat(self, worker: str, *, now: float, lease_s: float) -> int:
        def extend(s: StoredTask) -> tuple[StoredTask, bool] | None:
            if s.worker != worker or s.state not in LEASED_STATES:
                return None
            return replace(s, lease_expires=now + lease_s), True

        held = [s.task_id for s in self.store.mirror.held_by(worker)]
        return len(await self.store.each((task_id, extend) for task_id in held))

    # -- outcomes ------------------------------------------------------------------------------

    async def finish(
        self, outcomes: Sequence[Outcome], *, now: float, retry_delay: Callable[[int], float]
    ) -> list[Change]:
        def end(outcome: Outcome) -> Decide[Change]:
            def decide(s: StoredTask) -> tuple[StoredTask, Change] | None:
                r = s.record
                if r.lease_token != outcome.lease_token:
                    return None  # a stale report: the task was leased again since
                t = next_state(facts(r), Trigger.of(outcome.kind), now, retry_delay)
                if t.ignored:
                    return None  # a repeated report: the task already moved on
                # ``ok`` with no cancel asked clears the error (the embedded queue's fast path)
                error = (
                    None
                    if outcome.kind is OutcomeKind.OK and not r.cancel_requested
                    else outcome.error
                )
                ended = persist(s, t, now).with_record(
                    exit_code=outcome.exit_code,
                    error=error,
                    stdout_tail=outcome.stdout_tail,
                    stderr_tail=outcome.stderr_tail,
                )
                change = Change(
                    r.task_id,
                    t.previous,
                    t.state,
                    t.attempts,
                    r.device,
                    exit_code=outcome.exit_code,
                    error=error,
                    run_s=outcome.run_s if outcome.kind is not OutcomeKind.RELEASED else None,
                    type=r.type,
                    estimate_key=r.estimate_key if t.state is TaskState.DONE else None,
                )
                return ended, change

            return decide

        changes = await self.store.each((o.task_id, end(o)) for o in outcomes)
        await self._learn(changes)
        return changes

    async def _learn(self, changes: Sequence[Change]) -> None:
        """Fold the run times of the tasks that ended done into the moving average per
        command (one compare-and-set per command, however many tasks ended)."""
        runs: dict[str, list[float]] = {}
        for change in changes:
            if change.state is TaskState.DONE and change.estimate_key and change.run_s is not None:
                runs.setdefault(change.estimate_key, []).append(change.run_s)
        for key, values in runs.items():
            await self._learn_one(key, values)

    async def _learn_one(self, estimate_key: str, values: Sequence[float]) -> None:
        name = rec.duration_key(estimate_key)
        held = self.store.mirror.durations.get(name)
        for _ in range(CAS_TRIES):
            mean, n = (None, 0) if held is None else (held[0].mean_s, held[0].n)
            for value in values:
                mean = value if mean is None else mean + self.estimate_alpha * (value - mean)
            assert mean is not None
            duration = Duration(estimate_key, mean, n + len(values))
            data = rec.encode_duration(duration)
            if held is None:
                revision = await self.bucket.create(name, data, None)
            else:
                revision = await self.bucket.update(name, data, held[1])
            if revision is not None:
                for mirror in self.store.mirrors():
                    mirror.put_duration(name, duration, revision)
                return
            value_now = await self.bucket.get(name)
            held = None
            if value_now is not None and value_now.data is not None:
                held = (rec.decode_duration(value_now.data), value_now.revision)
        log.warning("learned run time of %s not saved: too many concurrent writers", estimate_key)

    async def cancel(self, task_id: str, now: float) -> tuple[TaskRecord | None, list[Change]]:
        def decide(s: StoredTask) -> tuple[StoredTask, Change | None] | None:
            t = next_state(facts(s.record), Trigger.CANCEL, now, no_backoff)
            if t.ignored:
                return None
            r = s.record
            change = transition_change(task_id, t, r.type, r.device) if t.changed else None
            return persist(s, t, now), change

        change = await self.store.change(task_id, decide)
        held = await self.store.held(task_id)
        if held is None:
            return None, []
        return held[0].record, [] if change is None else [change]

    async def promote_due(self, now: float) -> list[Change]:
        def decide(s: StoredTask) -> tuple[StoredTask, Change] | None:
            t = next_state(facts(s.record), Trigger.DUE, now, no_backoff)
            if not t.changed:
                return None
            return persist(s, t, now), transition_change(s.task_id, t, s.record.type)

        due = [
            s.task_id
            for s in self.store.mirror.in_state(TaskState.RETRY)
            if s.record.not_before is not None and s.record.not_before <= now
        ]
        return await self.store.each((task_id, decide) for task_id in due)

    async def expire_leases(
        self,
        now: float,
        *,
        all_leases: bool = False,
        max_lease_losses: int = DEFAULT_MAX_LEASE_LOSSES,
    ) -> tuple[list[Change], list[Orphan]]:
        """Take back leases past their expiry (every lease: ``all_leases``), as the embedded
        queue does: queued again, cancelled, or failed after ``max_lease_losses``; the process
        the lost attempt started is reported."""

        def expired(s: StoredTask) -> bool:
            if s.state not in LEASED_STATES:
                return False
            return all_leases or (s.lease_expires is not None and s.lease_expires < now)

        def decide(s: StoredTask) -> tuple[StoredTask, tuple[Change, Orphan | None]] | None:
            if not expired(s):
                return None
            r = s.record
            t = next_state(
                facts(r), Trigger.LEASE_LOST, now, no_backoff, max_lease_losses=max_lease_losses
            )
            orphan = None if r.pid is None else Orphan(r.task_id, r.pid, s.pid_started)
            return persist(s, t, now), (transition_change(r.task_id, t, r.type, r.device), orphan)

        leased = self.store.mirror.in_state(TaskState.SCHEDULED, TaskState.RUNNING)
        done = await self.store.each((s.task_id, decide) for s in leased if expired(s))
        return [c for c, _ in done], [o for _, o in done if o is not None]

    async def purge(self, *, ended_before: float, limit: int) -> list[Purged]:
        """Delete up to ``limit`` tasks that ended before ``ended_before`` (and their
        idempotency keys); never the newest task, as the embedded queue. The delete markers
        of keys deleted ``marker_keep_s`` ago or more go too (``TaskStore.sweep``)."""
        candidates = self.store.mirror.purgeable(ended_before, limit)
        found = await bounded(partial(self._purge_one, s) for s in candidates)
        await self.store.sweep(older_than_s=self.marker_keep_s, limit=2 * limit)
        return [p for p in found if p is not None]

    async def _purge_one(self, s: StoredTask) -> Purged | None:
        r = s.record
        revision = self.store.mirror.revisions.get(r.task_id)
        if revision is None:
            return None
        deleted = await self.bucket.delete(rec.task_key(r.task_id), revision)
        if deleted is None:
            return None  # changed since it was read: kept
        for mirror in self.store.mirrors():
            mirror.delete_task(r.task_id, deleted)
        if r.idempotency_key is not None:
            await self._drop_key(rec.idempotency_key(r.idempotency_key), r.task_id)
        return Purged(r.task_id, r.attempts, s.maintenance, r.state)

    async def _drop_key(self, name: str, task_id: str) -> None:
        held = self.store.mirror.keys.get(name)
        if held is None or held[0].task_id != task_id:
            return
        deleted = await self.bucket.delete(name, held[1])
        if deleted is not None:
            for mirror in self.store.mirrors():
                mirror.put_key(name, None, deleted)

    def __repr__(self) -> str:
        return f"JetStreamQueue(bucket={self.bucket.name!r}, tasks={len(self.store.mirror.tasks)})"

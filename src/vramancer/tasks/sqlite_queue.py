"""The embedded durable task queue: one SQLite file in WAL mode (``<data_dir>/tasks.sqlite``).

Durability: every mutation commits before its caller hears back. With ``synchronous=FULL`` (the
default) the commits that answer a user are fsynced: a submission, a cancel, and the end of a
task (done, failed, retry) survive a power cut. The dispatcher's own bookkeeping (leases,
``running`` marks, heartbeats, lease expiry, back-off promotion) commits without fsync: it
survives a daemon crash, and if a power cut loses it the task is simply taken back and run
again, which at-least-once execution allows. (A later fsynced commit makes the earlier ones
durable too: the WAL is written in order.) With ``NORMAL`` nothing is fsynced: everything
survives a daemon crash, a power cut may lose the last commits.

Speed: one writer thread owns the write connection and *group-commits*: every operation waiting
when it wakes runs inside one transaction (each in its own SAVEPOINT, so one failing operation
does not undo the others), then a single COMMIT (one fsync) acknowledges them all. Reads use
per-thread connections (WAL readers never block the writer). Indexes keep the hot paths
O(log n) however many tasks are queued:

* ``tasks_ready``: partial index over ready tasks in dispatch order (lane, priority, expected
  run time, submission order), so taking the next tasks never scans the queue;
* ``tasks_state_seq``: history pages of one state by cursor, newest first, and the few tasks in
  back-off (``retry``) or leased (``scheduled``, ``running``) for promotion, heartbeats, expiry;
* the primary key ``seq``: history pages by cursor, newest first;
* ``tasks_user_age``: partial index over ready *user* tasks by the time they became ready, so
  the dispatcher finds the tasks that have waited longest (aging) without a scan; maintenance
  tasks do not age (they wait for idle windows by design) and do not pay for it;
* ``tasks_submitted``: turns ``since`` into a ``seq`` bound (history, and retention purges).

Ended tasks older than ``[tasks] retention_s`` are deleted in small batches (``purge``). The
newest row is never purged, so ``seq`` (the cursor) keeps growing and is never reused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue as stdqueue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from vramancer.arbiter.types import Priority
from vramancer.errors import BackendUnavailable, disk_full_error, is_disk_full
from vramancer.tasks.errors import IdempotencyKeyTaken, QuotaExceeded, TaskIdTaken
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
    TaskType,
)
from vramancer.tasks.queue import Orphan, Purged
from vramancer.tasks.settings import DEFAULT_MAX_LEASE_LOSSES, Synchronous
from vramancer.tasks.transitions import (
    TaskFacts,
    Transition,
    Trigger,
    next_state,
    no_backoff,
    sources,
    step,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
SCHEMA_VERSION = 4
#: Operations committed together at most (one transaction, one fsync).
GROUP_COMMIT_MAX = 512
#: SQLite page cache per connection (negative: KiB).
CACHE_KIB = 65536
_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    idem_key TEXT,
    type TEXT NOT NULL,
    lane INTEGER NOT NULL,
    prio INTEGER NOT NULL,
    priority TEXT NOT NULL,
    est_ms INTEGER NOT NULL,
    est_key TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    gpu INTEGER,
    vram_bytes INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    timeout_s REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0,
    lease_expires REAL,
    worker TEXT,
    device TEXT,
    pid INTEGER,
    pid_started REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT,
    stdout_tail TEXT NOT NULL DEFAULT '',
    stderr_tail TEXT NOT NULL DEFAULT '',
    submitted_at REAL NOT NULL,
    ready_at REAL NOT NULL,
    scheduled_at REAL,
    started_at REAL,
    finished_at REAL,
    not_before REAL,
    updated_at REAL NOT NULL,
    lease_losses INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT 'local'
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idem ON tasks(idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks(lane, prio DESC, est_ms, seq)
    WHERE state IN ('queued', 'waiting_gpu');
CREATE INDEX IF NOT EXISTS tasks_state_seq ON tasks(state, seq);
CREATE INDEX IF NOT EXISTS tasks_user_age ON tasks(ready_at)
    WHERE state IN ('queued', 'waiting_gpu') AND lane = 0;
CREATE INDEX IF NOT EXISTS tasks_submitted ON tasks(submitted_at);
CREATE INDEX IF NOT EXISTS tasks_owner_open ON tasks(owner, lane, seq)
    WHERE state IN ('queued', 'waiting_gpu', 'retry', 'scheduled', 'running');
CREATE INDEX IF NOT EXISTS tasks_maint_age ON tasks(ready_at)
    WHERE state IN ('queued', 'waiting_gpu') AND lane = 1;
CREATE TABLE IF NOT EXISTS durations (
    key TEXT PRIMARY KEY,
    mean_s REAL NOT NULL,
    n INTEGER NOT NULL
);
"""

_COLS = (
    "id, seq, type, state, priority, spec, attempts, max_retries, timeout_s, est_ms, est_key, "
    "gpu, vram_bytes, device, lease_token, exit_code, error, submitted_at, scheduled_at, "
    "started_at, finished_at, not_before, cancel_requested, pid, stdout_tail, stderr_tail, "
    "idem_key, lease_losses, ready_at, owner"
)
_READY_SQL = (
    f"SELECT {_COLS} FROM tasks WHERE state IN ('queued', 'waiting_gpu') AND lane = ? "
    "ORDER BY prio DESC, est_ms, seq LIMIT ? OFFSET ?"
)
#: ``lane = 0`` is a literal so that the partial index ``tasks_user_age`` applies; INDEXED BY
#: because without statistics SQLite would rather scan the user lane of ``tasks_ready`` and sort.
_OVERDUE_SQL = (
    f"SELECT {_COLS} FROM tasks INDEXED BY tasks_user_age "
    "WHERE state IN ('queued', 'waiting_gpu') AND lane = 0 "
    "AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?"
)
_INSERT_SQL = (
    "INSERT INTO tasks (id, idem_key, type, lane, prio, priority, est_ms, est_key, state, spec, "
    "gpu, vram_bytes, max_retries, timeout_s, submitted_at, ready_at, updated_at, owner) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_OVERDUE_MAINT_SQL = (
    f"SELECT {_COLS} FROM tasks INDEXED BY tasks_maint_age "
    "WHERE state IN ('queued', 'waiting_gpu') AND lane = 1 "
    "AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?"
)
_OPEN_STATES = "('queued', 'waiting_gpu', 'retry', 'scheduled', 'running')"
#: A lease (``next_state``'s ``LEASE`` step, a new attempt); ``{states}``: its guard.
_LEASE_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, not_before = ?, started_at = ?, "
    "lease_token = lease_token + 1, lease_expires = ?, worker = ?, device = ?, scheduled_at = ?, "
    "exit_code = NULL, error = NULL, pid = NULL, pid_started = NULL, updated_at = ? "
    f"WHERE id = ? AND state IN ({{states}}) RETURNING {_COLS}"
)
#: The ``running`` mark (the ``START`` step) under the lease token.
_START_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, started_at = coalesce(?, started_at), "
    "pid = ?, pid_started = ?, updated_at = ? WHERE id = ? AND lease_token = ? "
    "AND state IN ({states}) RETURNING attempts, device, ready_at, type"
)
#: ``waiting_gpu`` with the dispatcher's reason (the ``WAIT`` step from the state it read).
_WAIT_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, error = ?, updated_at = ? "
    "WHERE id = ? AND state = ? AND error IS NOT ? RETURNING attempts, type"
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database of an earlier schema up to ``SCHEMA_VERSION`` (new columns; new indexes
    come from ``_SCHEMA``'s ``IF NOT EXISTS``)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    if columns and version < 2 and "lease_losses" not in columns:
        conn.execute("ALTER TABLE tasks ADD COLUMN lease_losses INTEGER NOT NULL DEFAULT 0")
    if version < 3:  # version 2 aged both lanes: replaced by tasks_user_age
        conn.execute("DROP INDEX IF EXISTS tasks_ready_age")
    if columns and "owner" not in columns:  # version 4: tasks belong to their submitter
        conn.execute("ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT 'local'")


def _record(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        task_id=row[0],
        seq=row[1],
        type=TaskType(row[2]),
        state=TaskState(row[3]),
        priority=Priority(row[4]),
        spec_json=row[5],
        attempts=row[6],
        max_retries=row[7],
        timeout_s=row[8],
        estimate_s=row[9] / 1000.0,
        estimate_key=row[10],
        gpu=row[11],
        vram_bytes=row[12],
        device=row[13],
        lease_token=row[14],
        exit_code=row[15],
        error=row[16],
        submitted_at=row[17],
        scheduled_at=row[18],
        started_at=row[19],
        finished_at=row[20],
        not_before=row[21],
        cancel_requested=bool(row[22]),
        pid=row[23],
        stdout_tail=row[24],
        stderr_tail=row[25],
        idempotency_key=row[26],
        lease_losses=row[27],
        ready_at=row[28],
        owner=row[29],
    )


#: The columns ``TaskFacts`` is read from, in its order.
_FACTS = "state, attempts, max_retries, lease_losses, cancel_requested, not_before"
_APPLY_SQL = (
    "UPDATE tasks SET state = ?, attempts = ?, lease_losses = ?, cancel_requested = ?, "
    "not_before = ?, ready_at = coalesce(?, ready_at), finished_at = coalesce(?, finished_at), "
    "device = CASE WHEN ? THEN NULL ELSE device END, "
    "worker = CASE WHEN ? THEN NULL ELSE worker END, "
    "lease_expires = CASE WHEN ? THEN NULL ELSE lease_expires END, "
    "error = coalesce(?, error), updated_at = ? WHERE id = ?"
)


def _facts(row: Sequence[Any]) -> TaskFacts:
    state, attempts, max_retries, losses, cancel, not_before = row
    return TaskFacts(TaskState(state), attempts, max_retries, losses, bool(cancel), not_before)


def _unleased(t: Transition) -> bool:
    """Leaving the leased states gives the lease up (worker, expiry)."""
    return t.previous in LEASED_STATES and t.state not in LEASED_STATES


def _apply(conn: sqlite3.Connection, task_id: str, t: Transition, now: float) -> None:
    """Persist ``t`` (``next_state``'s decision): the queue decides nothing here. Leaving the
    leased states gives the lease up."""
    unleased = _unleased(t)
    conn.execute(
        _APPLY_SQL,
        (
            t.state,
            t.attempts,
            t.lease_losses,
            t.cancel_requested,
            t.not_before,
            t.ready_at,
            t.finished_at,
            t.clear_device,
            unleased,
            unleased,
            t.reason,
            now,
            task_id,
        ),
    )


def _uniform(trigger: Trigger, now: float) -> tuple[tuple[TaskState, ...], Transition]:
    """The guard and the transition of a count-free trigger written as one update: the states
    ``step`` applies it to, which must all take the same step."""
    states = sources(trigger, now)
    steps = {replace(step(trigger, state, now), previous=states[0]) for state in states}
    if len(steps) != 1:
        raise AssertionError(f"{trigger}: not one step from {states}; write one per state")
    return states, steps.pop()


def _guarded(sql: str, states: Sequence[TaskState]) -> str:
    return sql.format(states=", ".join("?" * len(states)))


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: The lease step per ``Grant.running``.
_LEASES = {False: Trigger.LEASE, True: Trigger.LEASE_RUNNING}


class _GroupCommitWriter:
    """A thread that runs write operations, many per transaction, and acknowledges after COMMIT."""

    _STOP = object()

    def __init__(self, conn: sqlite3.Connection, fsync: bool) -> None:
        self._conn = conn
        #: Whether durable operations are fsynced (``synchronous=FULL``).
        self._fsync = fsync
        self._synced_mode = fsync
        self._queue: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vramancer-tasks-db", daemon=True)
        self._thread.start()

    def submit(
        self, op: Callable[[sqlite3.Connection], T], durable: bool = True
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((op, future, durable))
        return future

    def stop(self) -> None:
        self._queue.put(self._STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < GROUP_COMMIT_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except stdqueue.Empty:
                    break
                if nxt is self._STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _set_sync(self, durable: bool) -> None:
        """fsync this commit only when it holds a durable operation (and the mode is FULL)."""
        wanted = self._fsync and durable
        if wanted != self._synced_mode:
            self._conn.execute(f"PRAGMA synchronous={'FULL' if wanted else 'NORMAL'}")
            self._synced_mode = wanted

    def _commit(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Any, bool]]) -> None:
        conn = self._conn
        results: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        try:
            self._set_sync(any(durable for _, _, durable in batch))
            conn.execute("BEGIN IMMEDIATE")
            for op, future, _ in batch:
                if not future.set_running_or_notify_cancel():
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    value = op(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, None, exc))
                    continue
                conn.execute("RELEASE op")
                results.append((future, value, None))
            conn.execute("COMMIT")
        except Exception as exc:  # the commit itself failed (disk full, I/O error ...)
            log.exception("task queue commit failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error: Exception = (
                disk_full_error(exc, "the task queue")
                if is_disk_full(exc)
                else BackendUnavailable(f"task queue database write failed: {exc}")
            )
            for _, future, _ in batch:
                if future.running():
                    future.set_exception(error)
            return
        for future, value, failure in results:
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(value)


class SqliteQueue:
    """The embedded ``TaskQueue``. See the module docstring for durability and indexes."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = Synchronous.FULL,
        estimate_alpha: float = 0.3,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.estimate_alpha = estimate_alpha
        self._writer: _GroupCommitWriter | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous.value.upper()}")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        conn.execute("PRAGMA temp_store=MEMORY")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _write(self, op: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run ``op`` in the writer's next transaction; ``durable=False``: no fsync needed."""
        if self._writer is None:
            raise BackendUnavailable("the task queue is not open")
        return await asyncio.wrap_future(self._writer.submit(op, durable))

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(lambda: op(self._reader()))

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def setup() -> sqlite3.Connection:
            conn = self._connect()
            _migrate(conn)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return conn

        conn = await asyncio.to_thread(setup)
        self._writer = _GroupCommitWriter(conn, fsync=self.synchronous is Synchronous.FULL)
        self._write_conn = conn

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        await asyncio.to_thread(writer.stop)
        self._write_conn.close()
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._local = threading.local()

    # -- submit --------------------------------------------------------------------------------

    async def submit(
        self, tasks: Sequence[NewTask], now: float, *, max_open_maintenance: int | None = None
    ) -> tuple[list[Submitted], list[Change]]:
        return await self._write(lambda conn: _submit(conn, tasks, now, max_open_maintenance))

    async def open_tasks(self, owner: str, *, limit: int) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute(
                f"SELECT {_COLS} FROM tasks INDEXED BY tasks_owner_open WHERE owner = ? "
                f"AND state IN {_OPEN_STATES} ORDER BY lane, seq LIMIT ?",
                (owner, limit),
            ).fetchall()
            return [_record(row) for row in rows]

        return await self._read(op)

    async def overdue_maintenance(self, *, ready_before: float, limit: int) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute(_OVERDUE_MAINT_SQL, (ready_before, limit)).fetchall()
            return [_record(row) for row in rows]

        return await self._read(op)

    # -- dispatch ------------------------------------------------------------------------------

    async def ready(self, *, maintenance: bool, limit: int, offset: int = 0) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            params = (1 if maintenance else 0, limit, offset)
            rows = conn.execute(_READY_SQL, params).fetchall()
            return [_record(row) for row in rows]

        return await self._read(op)

    async def lease(
        self, grants: Sequence[Grant], *, worker: str, now: float, lease_s: float
    ) -> tuple[list[TaskRecord], list[Change]]:
        if not grants:  # nothing to write: no transaction, no thread hop
            return [], []

        steps = {running: _uniform(_LEASES[running], now) for running in (False, True)}

        def op(conn: sqlite3.Connection) -> tuple[list[TaskRecord], list[Change]]:
            leased: list[TaskRecord] = []
            changes: list[Change] = []
            for grant in grants:
                states, t = steps[grant.running]
                row = conn.execute(
                    _guarded(_LEASE_SQL, states),
                    (
                        t.state,
                        t.attempts,
                        t.not_before,
                        t.started_at,
                        now + lease_s,
                        worker,
                        grant.device,
                        now,
                        now,
                        grant.task_id,
                        *states,
                    ),
                ).fetchone()
                if row is None:
                    continue
                record = _record(row)
                leased.append(record)
                changes.append(
                    Change(
                        record.task_id,
                        grant.previous,
                        t.state,
                        record.attempts,
                        grant.device,
                        wait_s=max(0.0, now - (record.ready_at or now)) if t.started_at else None,
                        type=record.type,
                    )
                )
            return leased, changes

        leased, changes = await self._write(op, durable=False)
        return leased, changes

    async def mark_running(
        self,
        task_id: str,
        lease_token: int,
        *,
        pid: int | None,
        pid_started: float | None,
        now: float,
    ) -> list[Change]:
        states, t = _uniform(Trigger.START, now)

        def op(conn: sqlite3.Connection) -> list[Change]:
            row = conn.execute(
                _guarded(_START_SQL, states),
                (
                    t.state,
                    t.attempts,
                    t.started_at,
                    pid,
                    pid_started,
                    now,
                    task_id,
                    lease_token,
                    *states,
                ),
            ).fetchone()
            if row is None:
                return []
            return [
                Change(
                    task_id,
                    t.previous,
                    t.state,
                    row[0],
                    row[1],
                    wait_s=max(0.0, now - row[2]),
                    type=TaskType(row[3]),
                )
            ]

        return await self._write(op, durable=False)

    async def set_waiting(
        self, reasons: Sequence[tuple[str, str, TaskState]], now: float
    ) -> list[Change]:
        if not reasons:
            return []

        steps = {seen: step(Trigger.WAIT, seen, now) for _, _, seen in reasons}

        def op(conn: sqlite3.Connection) -> list[Change]:
            changes = []
            for task_id, why, seen in reasons:
                # ``seen``: the state the dispatcher read, the update's guard.
                t = steps[seen]
                if t.ignored:
                    continue
                row = conn.execute(
                    _WAIT_SQL, (t.state, t.attempts, why, now, task_id, seen, why)
                ).fetchone()
                if row is not None and t.changed:
                    changes.append(
                        Change(
                            task_id,
                            t.previous,
                            t.state,
                            row[0],
                            error=why,
                            type=TaskType(row[1]),
                        )
                    )
            return changes

        return await self._write(op, durable=False)

    async def dispatch_view(
        self, *, limit: int, overdue_before: float | None, overdue_limit: int
    ) -> tuple[list[TaskRecord], list[TaskRecord]]:
        """In one read: the first ``limit`` ready user tasks in dispatch order, and up to
        ``overdue_limit`` ready user tasks that became ready at or before ``overdue_before``
        (none when it is None), those that have waited longest first (an index range on
        ``tasks_user_age``)."""

        def op(conn: sqlite3.Connection) -> tuple[list[TaskRecord], list[TaskRecord]]:
            page = conn.execute(_READY_SQL, (0, limit, 0)).fetchall() if limit > 0 else []
            overdue = []
            if overdue_before is not None:
                overdue = conn.execute(_OVERDUE_SQL, (overdue_before, overdue_limit)).fetchall()
            return [_record(row) for row in page], [_record(row) for row in overdue]

        return await self._read(op)

    async def purge(self, *, ended_before: float, limit: int) -> list[Purged]:
        """Delete up to ``limit`` tasks that ended (done, failed, cancelled) before
        ``ended_before``. Never the newest row, so ``seq`` is never reused. An index range per
        ended state (``tasks_state_seq``, ``seq`` below the first task submitted after the
        cut-off) that stops after ``limit`` rows: no sort, no scan of the table."""

        def op(conn: sqlite3.Connection) -> list[Purged]:
            newest = conn.execute("SELECT max(seq) FROM tasks").fetchone()[0]
            if newest is None:
                return []
            first_recent = conn.execute(
                "SELECT seq FROM tasks WHERE submitted_at >= ? ORDER BY submitted_at LIMIT 1",
                (ended_before,),
            ).fetchone()
            # Ended before the cut-off means submitted before it too: an index bound on seq.
            bound = newest if first_recent is None else min(newest, first_recent[0])
            rows = conn.execute(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE seq < ? "
                "AND state IN ('done', 'failed', 'cancelled') AND finished_at < ? LIMIT ?) "
                "RETURNING id, attempts, lane, state",
                (bound, ended_before, limit),
            ).fetchall()
            return [Purged(r[0], r[1], bool(r[2]), TaskState(r[3])) for r in rows]

        return await self._write(op, durable=False)

    async def heartbeat(self, worker: str, *, now: float, lease_s: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE tasks SET lease_expires = ? WHERE worker = ? "
                "AND state IN ('scheduled', 'running')",
                (now + lease_s, worker),
            )
            return cur.rowcount

        return await self._write(op, durable=False)

    async def finish(
        self, outcomes: Sequence[Outcome], *, now: float, retry_delay: Callable[[int], float]
    ) -> list[Change]:
        alpha = self.estimate_alpha

        done = _uniform(Trigger.OK, now)

        def op(conn: sqlite3.Connection) -> list[Change]:
            changes = []
            for outcome in outcomes:
                change = _finish_one(conn, outcome, now, retry_delay, done)
                if change is not None:
                    changes.append(change)
            _learn(conn, changes, alpha)
            return changes

        return await self._write(op)

    async def cancel(self, task_id: str, now: float) -> tuple[TaskRecord | None, list[Change]]:
        def op(conn: sqlite3.Connection) -> tuple[TaskRecord | None, list[Change]]:
            row = conn.execute(
                f"SELECT device, type, {_FACTS} FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None:
                return None, []
            device, kind, *facts = row
            t = next_state(_facts(facts), Trigger.CANCEL, now, no_backoff)
            changes = []
            if not t.ignored:
                _apply(conn, task_id, t, now)
            if t.changed:
                changes.append(
                    Change(
                        task_id,
                        t.previous,
                        t.state,
                        t.attempts,
                        device,
                        error=t.reason,
                        type=TaskType(kind),
                    )
                )
            record = conn.execute(f"SELECT {_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return _record(record), changes

        return await self._write(op)

    async def promote_due(self, now: float) -> list[Change]:
        def op(conn: sqlite3.Connection) -> list[Change]:
            rows = conn.execute(
                f"SELECT id, type, {_FACTS} FROM tasks WHERE state = 'retry' AND not_before <= ?",
                (now,),
            ).fetchall()
            changes = []
            for task_id, kind, *facts in rows:
                t = next_state(_facts(facts), Trigger.DUE, now, no_backoff)
                if t.changed:
                    _apply(conn, task_id, t, now)
                    changes.append(
                        Change(task_id, t.previous, t.state, t.attempts, type=TaskType(kind))
                    )
            return changes

        return await self._write(op, durable=False)

    async def expire_leases(
        self,
        now: float,
        *,
        all_leases: bool = False,
        max_lease_losses: int = DEFAULT_MAX_LEASE_LOSSES,
    ) -> tuple[list[Change], list[Orphan]]:
        """Take back leases past their expiry (or every lease, at start-up: ``all_leases``).

        The task is queued again (cancelled instead if a cancel was asked; failed once its
        lease was lost ``max_lease_losses`` times: a task that keeps killing its daemon must
        not crash-loop it), and the process the lost worker started is reported so the caller
        can make sure it is gone.
        """

        def op(conn: sqlite3.Connection) -> tuple[list[Change], list[Orphan]]:
            where = "state IN ('scheduled', 'running')"
            params: tuple[Any, ...] = ()
            if not all_leases:
                where += " AND lease_expires < ?"
                params = (now,)
            rows = conn.execute(
                f"SELECT id, device, pid, pid_started, type, {_FACTS} FROM tasks WHERE {where}",
                params,
            ).fetchall()
            changes, orphans = [], []
            for task_id, device, pid, pid_started, kind, *facts in rows:
                t = next_state(
                    _facts(facts),
                    Trigger.LEASE_LOST,
                    now,
                    no_backoff,
                    max_lease_losses=max_lease_losses,
                )
                _apply(conn, task_id, t, now)
                changes.append(
                    Change(
                        task_id,
                        t.previous,
                        t.state,
                        t.attempts,
                        device,
                        error=t.reason,
                        type=TaskType(kind),
                    )
                )
                if pid is not None:
                    orphans.append(Orphan(task_id, pid, pid_started))
            return changes, orphans

        return await self._write(op, durable=False)

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        def op(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(f"SELECT {_COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return None if row is None else _record(row)

        return await self._read(op)

    async def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        def op(conn: sqlite3.Connection) -> dict[str, TaskState]:
            found: dict[str, TaskState] = {}
            for chunk in _chunks(task_ids):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT id, state FROM tasks WHERE id IN ({marks})", chunk)
                found.update((task_id, TaskState(state)) for task_id, state in rows)
            return found

        return await self._read(op)

    async def history(
        self,
        *,
        state: TaskState | None,
        since: float | None,
        cursor: str | None,
        limit: int,
    ) -> HistoryPage:
        return await self._read(lambda conn: _history(conn, state, since, cursor, limit))

    async def counts(self) -> dict[tuple[bool, TaskState], int]:
        """Tasks per (maintenance lane?, state). A full index scan: used once at start-up."""

        def op(conn: sqlite3.Connection) -> dict[tuple[bool, TaskState], int]:
            rows = conn.execute(
                "SELECT lane, state, count(*) FROM tasks GROUP BY lane, state"
            ).fetchall()
            return {(bool(lane), TaskState(state)): n for lane, state, n in rows}

        return await self._read(op)

    async def learned_durations(self) -> dict[str, float]:
        def op(conn: sqlite3.Connection) -> dict[str, float]:
            return dict(conn.execute("SELECT key, mean_s FROM durations").fetchall())

        return await self._read(op)


def _known(
    conn: sqlite3.Connection, column: str, values: Sequence[str]
) -> dict[str, tuple[str, str]]:
    """``value -> (task id, owner)`` for the known ``values`` of ``column`` (id or idem_key)."""
    found: dict[str, tuple[str, str]] = {}
    for chunk in _chunks(values):
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT {column}, id, owner FROM tasks WHERE {column} IN ({marks})", chunk
        )
        found.update((value, (task_id, owner)) for value, task_id, owner in rows)
    return found


def _existing(
    t: NewTask, by_key: dict[str, tuple[str, str]], by_id: dict[str, tuple[str, str]]
) -> str | None:
    """The id of the task ``t`` is a repeat of (same owner), None if it is new; another
    owner's key or id refuses the submission without naming that task."""
    key = t.spec.idempotency_key
    if key is not None and key in by_key:
        task_id, owner = by_key[key]
        if owner != t.owner:
            raise IdempotencyKeyTaken(
                f"idempotency_key {key!r} is already used by another caller's task; choose "
                "another key",
                field="idempotency_key",
            )
        return task_id
    if t.task_id in by_id:
        if by_id[t.task_id][1] != t.owner:
            raise TaskIdTaken(
                f"task_id {t.task_id!r} is already used by another caller's task; choose "
                "another id",
                field="task_id",
            )
        return t.task_id
    return None


def _check_quota(
    conn: sqlite3.Connection, tasks: Sequence[NewTask], new: int, max_open: int | None
) -> None:
    """Refuse when the owner would have more than ``max_open`` maintenance tasks not ended."""
    if max_open is None or new == 0:
        return
    owner = tasks[0].owner
    (open_now,) = conn.execute(
        "SELECT count(*) FROM tasks INDEXED BY tasks_owner_open WHERE owner = ? AND lane = 1 "
        f"AND state IN {_OPEN_STATES}",
        (owner,),
    ).fetchone()
    if open_now + new > max_open:
        raise QuotaExceeded(
            f"{open_now} maintenance task(s) of this caller have not ended yet and {new} more "
            f"were submitted; a viewer may have at most {max_open} "
            "([tasks] viewer_max_queued)",
            queued=open_now,
            limit=max_open,
        )


def _submit(
    conn: sqlite3.Connection, tasks: Sequence[NewTask], now: float, max_open: int | None = None
) -> tuple[list[Submitted], list[Change]]:
    """Insert the new tasks in one statement; the same owner's known idempotency keys and ids
    return the old task; another owner's refuse the whole submission."""
    by_key = _known(
        conn, "idem_key", [t.spec.idempotency_key for t in tasks if t.spec.idempotency_key]
    )
    by_id = _known(conn, "id", [t.task_id for t in tasks if t.spec.task_id])
    results: list[Submitted] = []
    changes: list[Change] = []
    rows = []
    maintenance = 0
    for t in tasks:
        old = _existing(t, by_key, by_id)
        if old is not None:
            results.append(Submitted(old, False))
            continue
        key = t.spec.idempotency_key
        if key is not None:
            by_key[key] = (t.task_id, t.owner)
        by_id[t.task_id] = (t.task_id, t.owner)
        maintenance += t.maintenance
        spec = t.spec
        rows.append(
            (
                t.task_id,
                key,
                spec.type.value,
                1 if t.maintenance else 0,
                t.priority_rank,
                spec.priority.value,
                round(t.estimate_s * 1000),
                t.estimate_key,
                t.spec_json,
                spec.gpu,
                spec.vram_bytes,
                t.max_retries,
                t.timeout_s,
                now,
                now,
                now,
                t.owner,
            )
        )
        results.append(Submitted(t.task_id, True))
        changes.append(Change(t.task_id, None, TaskState.QUEUED, 0, type=spec.type))
    _check_quota(conn, tasks, maintenance, max_open)
    conn.executemany(_INSERT_SQL, rows)
    return results, changes


#: An attempt that ended ``ok`` (the ``OK`` step: no cancel asked) under its lease token.
_DONE_SQL = (
    "UPDATE tasks SET state = ?, attempts = attempts + ?, not_before = ?, "
    "finished_at = coalesce(?, finished_at), worker = CASE WHEN ? THEN NULL ELSE worker END, "
    "lease_expires = CASE WHEN ? THEN NULL ELSE lease_expires END, exit_code = ?, error = NULL, "
    "stdout_tail = ?, stderr_tail = ?, updated_at = ? WHERE id = ? AND lease_token = ? "
    "AND cancel_requested = 0 AND state IN ({states}) "
    "RETURNING attempts, device, est_key, type, started_at IS NOT NULL"
)


def _learn(conn: sqlite3.Connection, changes: Sequence[Change], alpha: float) -> None:
    """Fold the run times of the tasks that ended done into the moving average per command:
    one read and one write per command, however many tasks ended."""
    runs: dict[str, list[float]] = {}
    for change in changes:
        if change.state is TaskState.DONE and change.estimate_key and change.run_s is not None:
            runs.setdefault(change.estimate_key, []).append(change.run_s)
    for key, values in runs.items():
        row = conn.execute("SELECT mean_s, n FROM durations WHERE key = ?", (key,)).fetchone()
        mean, n = (None, 0) if row is None else row
        for value in values:
            mean = value if mean is None else mean + alpha * (value - mean)
        conn.execute(
            "INSERT OR REPLACE INTO durations (key, mean_s, n) VALUES (?, ?, ?)",
            (key, mean, n + len(values)),
        )


def _finish_one(
    conn: sqlite3.Connection,
    outcome: Outcome,
    now: float,
    retry_delay: Callable[[int], float],
    done: tuple[tuple[TaskState, ...], Transition],
) -> Change | None:
    if outcome.kind is OutcomeKind.OK:
        change = _finish_done(conn, outcome, now, done)
        if change is not None:
            return change
    row = conn.execute(
        f"SELECT lease_token, device, est_key, type, {_FACTS} FROM tasks WHERE id = ?",
        (outcome.task_id,),
    ).fetchone()
    if row is None:
        return None
    token, device, est_key, kind, *facts = row
    if token != outcome.lease_token:
        return None  # a stale report: the task was leased again since
    t = next_state(_facts(facts), Trigger.of(outcome.kind), now, retry_delay)
    if t.ignored:
        return None  # a repeated report: the task already moved on
    _apply(conn, outcome.task_id, t, now)
    conn.execute(
        "UPDATE tasks SET exit_code = ?, error = ?, stdout_tail = ?, stderr_tail = ? WHERE id = ?",
        (
            outcome.exit_code,
            outcome.error,
            outcome.stdout_tail,
            outcome.stderr_tail,
            outcome.task_id,
        ),
    )
    return Change(
        outcome.task_id,
        t.previous,
        t.state,
        t.attempts,
        device,
        exit_code=outcome.exit_code,
        error=outcome.error,
        run_s=outcome.run_s if outcome.kind is not OutcomeKind.RELEASED else None,
        type=TaskType(kind),
        estimate_key=est_key if t.state is TaskState.DONE else None,
    )


def _finish_done(
    conn: sqlite3.Connection,
    outcome: Outcome,
    now: float,
    done: tuple[tuple[TaskState, ...], Transition],
) -> Change | None:
    """The common case in one statement: ``done`` (the ``OK`` step and its guard) written
    without reading the task first; None: not applicable (cancel asked, stale, moved on)."""
    states, t = done
    unleased = _unleased(t)
    row = conn.execute(
        _guarded(_DONE_SQL, states),
        (
            t.state,
            t.attempts,
            t.not_before,
            t.finished_at,
            unleased,
            unleased,
            outcome.exit_code,
            outcome.stdout_tail,
            outcome.stderr_tail,
            now,
            outcome.task_id,
            outcome.lease_token,
            *states,
        ),
    ).fetchone()
    if row is None:
        return None
    attempts, device, est_key, kind, was_running = row
    return Change(
        outcome.task_id,
        TaskState.RUNNING if was_running else TaskState.SCHEDULED,
        t.state,
        attempts,
        device,
        exit_code=outcome.exit_code,
        run_s=outcome.run_s,
        type=TaskType(kind),
        estimate_key=est_key,
    )


def _history(
    conn: sqlite3.Connection,
    state: TaskState | None,
    since: float | None,
    cursor: str | None,
    limit: int,
) -> HistoryPage:
    """Newest first, keyset-paged on ``seq``: each page is an index range, constant time."""
    conds: list[str] = []
    params: list[Any] = []
    if cursor is not None:
        conds.append("seq < ?")
        params.append(int(cursor))
    if state is not None:
        conds.append("state = ?")
        params.append(state.value)
    if since is not None:
        first = conn.execute(
            "SELECT seq FROM tasks WHERE submitted_at >= ? ORDER BY submitted_at LIMIT 1",
            (since,),
        ).fetchone()
        if first is None:
            return HistoryPage([], None)
        conds += ["seq >= ?", "submitted_at >= ?"]
        params += [first[0], since]
    where = ("WHERE " + " AND ".join(conds)) if conds else ""
    rows = conn.execute(
        f"SELECT {_COLS} FROM tasks {where} ORDER BY seq DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    records = [_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return HistoryPage(records, str(records[-1].seq) if more and records else None)

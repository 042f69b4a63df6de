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
does not undo the others), then a single COMMIT acknowledges them all; the WAL is synced for
the durable ones by a thread of its own (``sqlite_sync``), so the next commits (a lease) do not
wait for the disk. Reads use
per-thread connections (WAL readers never block the writer). Indexes keep the hot paths
O(log n) however many tasks are queued (``sqlite_schema``).

The modules: ``sqlite_schema`` (tables, indexes, migrations), ``sqlite_writer`` (the writer
thread and its group commit), ``sqlite_sync`` (the WAL sync after durable commits),
``sqlite_rows`` (rows as records, the reads), ``sqlite_submit`` (inserting a batch:
idempotency, owners, quota), ``sqlite_apply`` (writing the state machine's transitions, each as
one guarded update); this one is the ``TaskQueue`` over them.

Ended tasks older than ``[tasks] retention_s`` are deleted in small batches (``purge``). The
newest row is never purged, so ``seq`` (the cursor) keeps growing and is never reused.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from vramancer.errors import BackendUnavailable
from vramancer.tasks import sqlite_apply as apply
from vramancer.tasks import sqlite_schema as schema
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
from vramancer.tasks.queue import Orphan, Purged
from vramancer.tasks.settings import DEFAULT_MAX_LEASE_LOSSES, Synchronous
from vramancer.tasks.sqlite_rows import (
    COLS,
    OPEN_STATES,
    OVERDUE_MAINT_SQL,
    OVERDUE_SQL,
    READY_MAINT_SQL,
    READY_USER_SQL,
    chunks,
    history,
    to_record,
)
from vramancer.tasks.sqlite_submit import submit
from vramancer.tasks.sqlite_sync import WalSyncer
from vramancer.tasks.sqlite_writer import GroupCommitWriter
from vramancer.tasks.task_ids import prefix_bounds
from vramancer.tasks.transitions import Trigger, step

T = TypeVar("T")


class SqliteQueue:
    """The embedded ``TaskQueue``. See the module docstring for durability; ``sqlite_schema``
    for the indexes."""

    #: Writes are applied in the order they are asked for (one writer thread, one queue): a
    #: caller may ask for the next before the previous one is committed.
    keeps_order = True

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
        self._writer: GroupCommitWriter | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        return schema.connect(self.path, self.synchronous)

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
        return await self._writer.answer_on(asyncio.get_running_loop(), op, durable)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(lambda: op(self._reader()))

    def _read_now(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """``op`` on this thread's reader, at once: for the dispatcher's short index reads (a
        page of ready tasks), which cost less than the two thread switches of :meth:`_read`.
        A WAL reader never waits for the writer."""
        if self._writer is None:
            raise BackendUnavailable("the task queue is not open")
        return op(self._reader())

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def setup() -> sqlite3.Connection:
            conn = self._connect()
            schema.create(conn)
            return conn

        conn = await asyncio.to_thread(setup)
        fsync = self.synchronous is Synchronous.FULL
        syncer = WalSyncer(self.path.with_name(self.path.name + "-wal")) if fsync else None
        self._writer = GroupCommitWriter(conn, fsync=fsync, syncer=syncer)
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
        return await self._write(lambda conn: submit(conn, tasks, now, max_open_maintenance))

    async def open_tasks(self, owner: str, *, limit: int) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute(
                f"SELECT {COLS} FROM tasks INDEXED BY tasks_owner_open WHERE owner = ? "
                f"AND state IN {OPEN_STATES} ORDER BY lane, seq LIMIT ?",
                (owner, limit),
            ).fetchall()
            return [to_record(row) for row in rows]

        return await self._read(op)

    async def overdue_maintenance(self, *, ready_before: float, limit: int) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute(OVERDUE_MAINT_SQL, (ready_before, limit)).fetchall()
            return [to_record(row) for row in rows]

        return await self._read(op)

    # -- dispatch ------------------------------------------------------------------------------

    async def ready(self, *, maintenance: bool, limit: int, offset: int = 0) -> list[TaskRecord]:
        def op(conn: sqlite3.Connection) -> list[TaskRecord]:
            sql = READY_MAINT_SQL if maintenance else READY_USER_SQL
            rows = conn.execute(sql, (limit, offset)).fetchall()
            return [to_record(row) for row in rows]

        return self._read_now(op)

    async def lease(
        self, grants: Sequence[Grant], *, worker: str, now: float, lease_s: float
    ) -> tuple[list[TaskRecord], list[Change]]:
        if not grants:  # nothing to write: no transaction, no thread hop
            return [], []
        kinds = {grant.running for grant in grants}
        steps = {running: apply.uniform(apply.LEASES[running], now) for running in kinds}
        return await self._write(
            lambda conn: apply.lease(conn, grants, steps, worker=worker, now=now, lease_s=lease_s),
            durable=False,
        )

    async def mark_running(
        self,
        task_id: str,
        lease_token: int,
        *,
        pid: int | None,
        pid_started: float | None,
        now: float,
    ) -> list[Change]:
        start = apply.uniform(Trigger.START, now)
        return await self._write(
            lambda conn: apply.mark_running(
                conn, start, task_id, lease_token, pid=pid, pid_started=pid_started, now=now
            ),
            durable=False,
        )

    async def set_waiting(
        self, reasons: Sequence[tuple[str, str, TaskState]], now: float
    ) -> list[Change]:
        if not reasons:
            return []
        steps = {seen: step(Trigger.WAIT, seen, now) for _, _, seen in reasons}
        return await self._write(
            lambda conn: apply.set_waiting(conn, steps, reasons, now), durable=False
        )

    async def dispatch_view(
        self, *, limit: int, overdue_before: float | None, overdue_limit: int
    ) -> tuple[list[TaskRecord], list[TaskRecord]]:
        """In one read: the first ``limit`` ready user tasks in dispatch order, and up to
        ``overdue_limit`` ready user tasks that became ready at or before ``overdue_before``
        (none when it is None), those that have waited longest first (an index range on
        ``tasks_user_age``)."""

        def op(conn: sqlite3.Connection) -> tuple[list[TaskRecord], list[TaskRecord]]:
            page = conn.execute(READY_USER_SQL, (limit, 0)).fetchall() if limit > 0 else []
            overdue = []
            if overdue_before is not None:
                overdue = conn.execute(OVERDUE_SQL, (overdue_before, overdue_limit)).fetchall()
            return [to_record(row) for row in page], [to_record(row) for row in overdue]

        return self._read_now(op)

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
        done = apply.uniform(Trigger.OK, now)
        alpha = self.estimate_alpha
        return await self._write(
            lambda conn: apply.finish(
                conn, outcomes, now=now, retry_delay=retry_delay, done=done, alpha=alpha
            )
        )

    async def cancel(self, task_id: str, now: float) -> tuple[TaskRecord | None, list[Change]]:
        return await self._write(lambda conn: apply.cancel(conn, task_id, now))

    async def promote_due(self, now: float) -> list[Change]:
        return await self._write(lambda conn: apply.promote_due(conn, now), durable=False)

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
        return await self._write(
            lambda conn: apply.expire_leases(
                conn, now, all_leases=all_leases, max_lease_losses=max_lease_losses
            ),
            durable=False,
        )

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        def op(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(f"SELECT {COLS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return None if row is None else to_record(row)

        return await self._read(op)

    async def ids_with_prefix(self, prefix: str, *, limit: int) -> list[str]:
        low, high = prefix_bounds(prefix)

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM tasks WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                (low, high, limit),
            )
            return [task_id for (task_id,) in rows]

        return await self._read(op)

    async def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        def op(conn: sqlite3.Connection) -> dict[str, TaskState]:
            found: dict[str, TaskState] = {}
            for chunk in chunks(task_ids):
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
        return await self._read(lambda conn: history(conn, state, since, cursor, limit))

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

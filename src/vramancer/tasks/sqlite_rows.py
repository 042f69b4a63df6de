"""The SQLite queue's rows as records: the columns a ``TaskRecord`` is read from, the facts
the state machine reads (``TaskFacts``), and the reads that return records (dispatch order,
aging, history pages).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import HistoryPage, TaskRecord, TaskState, TaskType
from vramancer.tasks.transitions import TaskFacts

#: Values bound in one ``IN (...)`` at most.
CHUNK = 500

COLS = (
    "id, seq, type, state, priority, spec, attempts, max_retries, timeout_s, est_ms, est_key, "
    "gpu, vram_bytes, device, lease_token, exit_code, error, submitted_at, scheduled_at, "
    "started_at, finished_at, not_before, cancel_requested, pid, stdout_tail, stderr_tail, "
    "idem_key, lease_losses, ready_at, owner"
)
_READY_SQL = (
    f"SELECT {COLS} FROM tasks WHERE state IN ('queued', 'waiting_gpu') AND lane = {{lane}} "
    "ORDER BY prio DESC, est_ms, seq LIMIT ? OFFSET ?"
)
#: Ready tasks of one lane in dispatch order (``LIMIT ? OFFSET ?``). The lane is a literal:
#: bound as a parameter, the same index walk costs SQLite twice the time.
READY_USER_SQL = _READY_SQL.format(lane=0)
READY_MAINT_SQL = _READY_SQL.format(lane=1)
#: ``lane = 0`` is a literal so that the partial index ``tasks_user_age`` applies; INDEXED BY
#: because without statistics SQLite would rather scan the user lane of ``tasks_ready`` and sort.
OVERDUE_SQL = (
    f"SELECT {COLS} FROM tasks INDEXED BY tasks_user_age "
    "WHERE state IN ('queued', 'waiting_gpu') AND lane = 0 "
    "AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?"
)
OVERDUE_MAINT_SQL = (
    f"SELECT {COLS} FROM tasks INDEXED BY tasks_maint_age "
    "WHERE state IN ('queued', 'waiting_gpu') AND lane = 1 "
    "AND ready_at <= ? ORDER BY ready_at, seq LIMIT ?"
)
OPEN_STATES = "('queued', 'waiting_gpu', 'retry', 'scheduled', 'running')"


def to_record(row: Sequence[Any]) -> TaskRecord:
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
FACTS = "state, attempts, max_retries, lease_losses, cancel_requested, not_before"


def to_facts(row: Sequence[Any]) -> TaskFacts:
    state, attempts, max_retries, losses, cancel, not_before = row
    return TaskFacts(TaskState(state), attempts, max_retries, losses, bool(cancel), not_before)


def chunks(items: Sequence[str], size: int = CHUNK) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def history(
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
        f"SELECT {COLS} FROM tasks {where} ORDER BY seq DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    records = [to_record(row) for row in rows[:limit]]
    more = len(rows) > limit
    return HistoryPage(records, str(records[-1].seq) if more and records else None)

"""Submissions to the SQLite queue: one insert for a batch; the same owner's known idempotency
keys and task ids return the existing task, another owner's refuse the whole batch; the
maintenance quota is counted in the insert's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from vramancer.tasks.errors import IdempotencyKeyTaken, QuotaExceeded, TaskIdTaken
from vramancer.tasks.model import Change, NewTask, Submitted, TaskState
from vramancer.tasks.sqlite_rows import OPEN_STATES, chunks

_INSERT_SQL = (
    "INSERT INTO tasks (id, idem_key, type, lane, prio, priority, est_ms, est_key, state, spec, "
    "gpu, vram_bytes, max_retries, timeout_s, submitted_at, ready_at, updated_at, owner) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _known(
    conn: sqlite3.Connection, column: str, values: Sequence[str]
) -> dict[str, tuple[str, str]]:
    """``value -> (task id, owner)`` for the known ``values`` of ``column`` (id or idem_key)."""
    found: dict[str, tuple[str, str]] = {}
    for chunk in chunks(values):
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
        f"AND state IN {OPEN_STATES}",
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


def submit(
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

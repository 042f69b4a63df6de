"""Whole task rows, read and written as they are: what HA replication ships and applies.

A primary reads the full row of each task that changed (``read_rows``); a standby writes those
rows as they are (``upsert_rows``, the primary's ``seq`` kept, so history pages and cursors are
the same on both) and removes the tasks the primary no longer has (``delete_rows``). These go
through the queue's own writer thread, so they commit like every other mutation.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vramancer.tasks.sqlite_queue import SqliteQueue
from vramancer.tasks.sqlite_rows import chunks

#: One task row: column name -> value, as SQLite stores it.
Row = dict[str, Any]


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [row[1] for row in conn.execute("PRAGMA table_info(tasks)")]


async def read_rows(queue: SqliteQueue, task_ids: Sequence[str]) -> dict[str, Row]:
    """The full row of each known task among ``task_ids`` (unknown ones are left out)."""

    def op(conn: sqlite3.Connection) -> dict[str, Row]:
        names = _columns(conn)
        out: dict[str, Row] = {}
        for part in chunks(list(task_ids)):
            marks = ",".join("?" * len(part))
            for values in conn.execute(f"SELECT * FROM tasks WHERE id IN ({marks})", part):
                row = dict(zip(names, values, strict=True))
                out[row["id"]] = row
        return out

    return await queue._read(op)


async def all_rows(queue: SqliteQueue) -> list[Row]:
    """Every task row, in ``seq`` order (a snapshot)."""

    def op(conn: sqlite3.Connection) -> list[Row]:
        names = _columns(conn)
        rows = conn.execute("SELECT * FROM tasks ORDER BY seq")
        return [dict(zip(names, values, strict=True)) for values in rows]

    return await queue._read(op)


async def all_ids(queue: SqliteQueue) -> list[str]:
    """Every task id, in ``seq`` order."""

    def op(conn: sqlite3.Connection) -> list[str]:
        return [row[0] for row in conn.execute("SELECT id FROM tasks ORDER BY seq")]

    return await queue._read(op)


def take_leased_rows(path: Path) -> list[Row]:
    """The rows of leased tasks (``scheduled``, ``running``) in the database at ``path``, read
    before the queue opens, their ``pid`` then cleared in the file: opening the queue takes
    leases back and kills the processes they name, and on an HA standby those are the
    primary's (perhaps on this very machine). None when there is no database yet."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        names = _columns(conn)
        if not names:
            return []
        where = "WHERE state IN ('scheduled', 'running')"
        rows = [
            dict(zip(names, v, strict=True)) for v in conn.execute(f"SELECT * FROM tasks {where}")
        ]
        if rows:
            conn.execute(f"UPDATE tasks SET pid = NULL, pid_started = NULL {where}")
        return rows
    finally:
        conn.close()


async def upsert_rows(queue: SqliteQueue, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write ``rows`` as they are (replacing a task of the same id, seq or idempotency key);
    columns this schema does not have are refused (``ValueError`` naming them)."""

    def op(conn: sqlite3.Connection) -> int:
        known = set(_columns(conn))
        for row in rows:
            unknown = sorted(set(row) - known)
            if unknown:
                raise ValueError(f"task row: unknown column(s) {', '.join(unknown)}")
            names = list(row)
            conn.execute(
                f"INSERT OR REPLACE INTO tasks ({', '.join(names)}) "
                f"VALUES ({', '.join('?' * len(names))})",
                [row[name] for name in names],
            )
        return len(rows)

    return await queue._write(op)


async def delete_rows(queue: SqliteQueue, task_ids: Sequence[str]) -> int:
    """Remove the tasks ``task_ids``; returns how many there were."""

    def op(conn: sqlite3.Connection) -> int:
        removed = 0
        for part in chunks(list(task_ids)):
            marks = ",".join("?" * len(part))
            removed += conn.execute(f"DELETE FROM tasks WHERE id IN ({marks})", part).rowcount
        return removed

    return await queue._write(op)


async def replace_all(queue: SqliteQueue, rows: Sequence[Mapping[str, Any]]) -> int:
    """Make the table hold exactly ``rows`` (a snapshot applied on a standby)."""
    keep = {str(row["id"]) for row in rows}

    def clear(conn: sqlite3.Connection) -> int:
        ids = [r[0] for r in conn.execute("SELECT id FROM tasks")]
        gone = [i for i in ids if i not in keep]
        for part in chunks(gone):
            conn.execute(f"DELETE FROM tasks WHERE id IN ({','.join('?' * len(part))})", part)
        return len(gone)

    await queue._write(clear)
    return await upsert_rows(queue, rows)

"""What a standby holds of the primary that has no home in its own subsystems:
``<data_dir>/ha/replica.sqlite``.

* block entries whose bytes were not shipped (a block in a RAM tier, or ``[ha]
  replicate_data`` off): the standby knows the block exists and what it was, not its bytes;
* allocations made by hand on the primary (``POST /v1/allocations``): recorded, so that an
  operator can see, after a promotion, what the clients of the old primary held.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from vramancer.files import private_dir, touch_private

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (id TEXT PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (id TEXT PRIMARY KEY, allocation TEXT NOT NULL);
"""
_TABLES = {"blocks": "entry", "allocations": "allocation"}


class ReplicaState:
    """Two small tables of JSON objects keyed by id (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._conn is not None:
            return
        private_dir(self.path.parent)
        if not self.path.exists():
            touch_private(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the HA replica state is not open")
        return self._conn

    def put(self, table: str, key: str, value: dict[str, Any]) -> None:
        column = _TABLES[table]
        with self._lock:
            self._db().execute(
                f"INSERT OR REPLACE INTO {table} (id, {column}) VALUES (?, ?)",
                (key, json.dumps(value, sort_keys=True)),
            )

    def delete(self, table: str, key: str) -> None:
        _TABLES[table]
        with self._lock:
            self._db().execute(f"DELETE FROM {table} WHERE id = ?", (key,))

    def clear(self, table: str) -> None:
        _TABLES[table]
        with self._lock:
            self._db().execute(f"DELETE FROM {table}")

    def items(self, table: str) -> list[dict[str, Any]]:
        column = _TABLES[table]
        with self._lock:
            rows = self._db().execute(f"SELECT {column} FROM {table} ORDER BY id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def count(self, table: str) -> int:
        _TABLES[table]
        with self._lock:
            return int(self._db().execute(f"SELECT count(*) FROM {table}").fetchone()[0])

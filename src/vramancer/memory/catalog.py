"""Persistent metadata of the blocks that live in files (L5, L6): ``<data_dir>/memory.sqlite``.

One row per block on disk, written after its file is complete (and fsynced), so a restart
finds every block that was on disk. L1–L4 blocks are volatile and have no row. WAL mode;
``synchronous=FULL`` when the store fsyncs (a committed move survives a power loss), ``OFF``
when it does not (tests, scratch data).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    tier TEXT NOT NULL,
    priority INTEGER NOT NULL,
    pinned INTEGER NOT NULL,
    hint TEXT,
    kind TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    itemsize INTEGER NOT NULL,
    file TEXT NOT NULL,
    codec TEXT NOT NULL,
    stored_size INTEGER NOT NULL,
    hits REAL NOT NULL,
    created REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class BlockRow:
    """One block on disk, as persisted."""

    id: str
    size: int
    tier: str
    priority: int
    pinned: bool
    hint: str | None
    kind: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    file: str
    codec: str
    stored_size: int
    #: Decayed hit count at the time of writing.
    hits: float
    #: Wall-clock creation time.
    created: float


class Catalog:
    """The SQLite table of blocks on disk. Thread-safe (its own lock)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._fsync = fsync
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.execute(_SCHEMA)

    def upsert(self, row: BlockRow, *, durable: bool = True) -> None:
        """Insert or replace a row. ``durable=False`` skips the fsync of this commit (see
        ``delete``); the next durable commit makes it durable too."""
        values = (
            row.id,
            row.size,
            row.tier,
            row.priority,
            int(row.pinned),
            row.hint,
            row.kind,
            row.dtype,
            json.dumps(list(row.shape)),
            row.itemsize,
            row.file,
            row.codec,
            row.stored_size,
            row.hits,
            row.created,
        )
        self._run(
            "INSERT OR REPLACE INTO blocks VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", values, durable
        )

    def delete(self, block_id: str, *, durable: bool = True) -> None:
        """Remove a row. ``durable=False`` skips the fsync of this one commit: for a block that
        moves out of L5/L6 into volatile memory, where a crash loses the block either way (the
        row would then name a file that is gone, and the restart drops it)."""
        self._run("DELETE FROM blocks WHERE id = ?", (block_id,), durable)

    def _run(self, sql: str, values: tuple[object, ...], durable: bool) -> None:
        with self._lock:
            if durable or not self._fsync:
                self._db.execute(sql, values)
                return
            self._db.execute("PRAGMA synchronous=OFF")
            try:
                self._db.execute(sql, values)
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def set_pinned(self, block_id: str, pinned: bool) -> None:
        with self._lock:
            self._db.execute("UPDATE blocks SET pinned = ? WHERE id = ?", (int(pinned), block_id))

    def rows(self) -> list[BlockRow]:
        with self._lock:
            cursor = self._db.execute(
                "SELECT id, size, tier, priority, pinned, hint, kind, dtype, shape, itemsize, "
                "file, codec, stored_size, hits, created FROM blocks"
            )
            raw = cursor.fetchall()
        return [
            BlockRow(
                id=r[0],
                size=int(r[1]),
                tier=r[2],
                priority=int(r[3]),
                pinned=bool(r[4]),
                hint=r[5],
                kind=r[6],
                dtype=r[7],
                shape=tuple(int(d) for d in json.loads(r[8])),
                itemsize=int(r[9]),
                file=r[10],
                codec=r[11],
                stored_size=int(r[12]),
                hits=float(r[13]),
                created=float(r[14]),
            )
            for r in raw
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()

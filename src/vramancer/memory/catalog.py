"""Persistent metadata of the blocks that live in files (L5, L6): ``<data_dir>/memory.sqlite``.

One row per block on disk, written after its file is complete (and fsynced), so a restart
finds every block that was on disk. L1–L4 blocks are volatile and have no row. WAL mode;
``synchronous=FULL`` when the store fsyncs (a committed move survives a power loss), ``OFF``
when it does not (tests, scratch data). The database file is ``0600``.

``file`` holds the block file's name *relative to its tier directory*, so a data directory can
be moved or copied; older catalogs held absolute paths, of which only the file name is used.
The catalog is an index, not the only copy of what it says: every block file carries a record
of its block (``blockfile.py``), and the store rebuilds missing rows from them at start. A row
that cannot be read is moved into the ``quarantine`` table (never dropped silently); a database
that cannot be read at all raises :class:`~vramancer.errors.CatalogCorrupt`, whose message
names the recovery (``vramancer memory recover``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vramancer.errors import CatalogCorrupt
from vramancer.files import FILE_MODE
from vramancer.memory.storage import full_disk_as

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
    created REAL NOT NULL,
    durable INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT,
    row TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
)
"""
#: SQLite result codes of a damaged database.
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_COLUMNS = (
    "id, size, tier, priority, pinned, hint, kind, dtype, shape, itemsize, file, codec, "
    "stored_size, hits, created, durable"
)


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
    #: Put durably: the block stays on the disk tiers (it is never promoted to memory).
    durable: bool = False


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that cannot be used: its id (if readable), its raw values and why."""

    id: str | None
    raw: tuple[object, ...]
    reason: str


def corrupt_message(path: Path, reason: str) -> str:
    """The one paragraph shown when the catalog cannot be read."""
    return (
        f"The memory store's catalog {path} cannot be read ({reason}). The blocks themselves "
        "are in their block files (the l5/ and l6/ tier directories) and nothing has been "
        "changed or removed. To recover: stop VRAMancer and run `vramancer memory recover` "
        "with the same --config / VRM_DATA_DIR; it moves the damaged catalog aside "
        "(memory.sqlite.aside-<time>, never deleted) and rebuilds the catalog from the block "
        "files. Then start VRAMancer again."
    )


def is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged (not busy, not full)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code in _CORRUPT_CODES or "malformed" in str(exc) or "not a database" in str(exc)


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if is_corrupt(exc):
            raise CatalogCorrupt(corrupt_message(path, str(exc)), path=str(path)) from exc
        raise


def check(path: Path) -> None:
    """Raise ``CatalogCorrupt`` if the database at ``path`` exists and is damaged (a quick
    check of its pages, read-only work); a missing or empty file is fine."""
    try:
        if path.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    with _readable(path):
        db = sqlite3.connect(path, isolation_level=None)
        try:
            found = db.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            db.close()
    if found is None or found[0] != "ok":
        raise CatalogCorrupt(corrupt_message(path, str(found and found[0])), path=str(path))


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns later versions introduced to a catalog written by an older one."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(blocks)").fetchall()}
    if "durable" not in columns:
        db.execute("ALTER TABLE blocks ADD COLUMN durable INTEGER NOT NULL DEFAULT 0")


def _row(raw: tuple[object, ...]) -> BlockRow:
    r = raw
    shape = json.loads(str(r[8]))
    if not isinstance(shape, list):
        raise ValueError("shape is not a list")
    row = BlockRow(
        id=str(r[0]),
        size=int(r[1]),  # type: ignore[call-overload]
        tier=str(r[2]),
        priority=int(r[3]),  # type: ignore[call-overload]
        pinned=bool(r[4]),
        hint=None if r[5] is None else str(r[5]),
        kind=str(r[6]),
        dtype=str(r[7]),
        shape=tuple(int(d) for d in shape),
        itemsize=int(r[9]),  # type: ignore[call-overload]
        file=str(r[10]),
        codec=str(r[11]),
        stored_size=int(r[12]),  # type: ignore[call-overload]
        hits=float(r[13]),  # type: ignore[arg-type]
        created=float(r[14]),  # type: ignore[arg-type]
        durable=bool(r[15]),
    )
    if row.size <= 0 or row.itemsize <= 0 or any(d < 0 for d in row.shape):
        raise ValueError("sizes must be positive")
    return row


_UPSERT = f"INSERT OR REPLACE INTO blocks ({_COLUMNS}) VALUES ({','.join('?' * 16)})"


def _values(row: BlockRow) -> tuple[object, ...]:
    return (
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
        int(row.durable),
    )


class Catalog:
    """The SQLite table of blocks on disk. Thread-safe (its own lock)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._fsync = fsync
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o077:
                path.chmod(FILE_MODE)
        with _readable(path):
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
                self._db.executescript(_SCHEMA)
                _migrate(self._db)
            except BaseException:
                self._db.close()
                raise

    def upsert(self, row: BlockRow, *, durable: bool = True, force_sync: bool = False) -> None:
        """Insert or replace a row. ``durable=False`` skips the fsync of this commit (see
        ``delete``); the next durable commit makes it durable too. ``force_sync``: fsync this
        commit even in a catalog opened without fsync (a durable put)."""
        self._run(_UPSERT, _values(row), (durable and self._fsync) or force_sync)

    def upsert_many(self, rows: list[BlockRow], *, durable: bool = True) -> None:
        """Insert or replace rows in one transaction (one fsync; none with ``durable=False``,
        as :meth:`upsert`)."""
        if not rows:
            return
        sync = durable and self._fsync
        with self._lock, full_disk_as(str(self.path)):
            if sync != self._fsync:
                self._db.execute("PRAGMA synchronous=OFF")
            try:
                self._db.execute("BEGIN")
                try:
                    self._db.executemany(_UPSERT, [_values(r) for r in rows])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                if sync != self._fsync:
                    self._db.execute("PRAGMA synchronous=FULL")

    def delete(self, block_id: str, *, durable: bool = True) -> None:
        """Remove a row. ``durable=False`` skips the fsync of this one commit: for a block that
        moves out of L5/L6 into volatile memory, where a crash loses the block either way (the
        row would then name a file that is gone, and the restart drops it)."""
        self._run("DELETE FROM blocks WHERE id = ?", (block_id,), durable and self._fsync)

    def _run(self, sql: str, values: tuple[object, ...], sync: bool) -> None:
        """Run one write, its commit fsynced or not (``sync``); a full disk raises
        ``InsufficientStorage`` and the write is rolled back."""
        with self._lock, full_disk_as(str(self.path)):
            if sync == self._fsync:
                self._db.execute(sql, values)
                return
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync else 'OFF'}")
            try:
                self._db.execute(sql, values)
            finally:
                self._db.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'OFF'}")

    def set_pinned(self, block_id: str, pinned: bool) -> None:
        with self._lock, full_disk_as(str(self.path)):
            self._db.execute("UPDATE blocks SET pinned = ? WHERE id = ?", (int(pinned), block_id))

    def rows(self) -> list[BlockRow]:
        """The usable rows (see :meth:`load` for the others)."""
        return self.load()[0]

    def load(self) -> tuple[list[BlockRow], list[BadRow]]:
        """Every row: the usable ones, and those that cannot be read (bad JSON, wrong types)."""
        with self._lock, _readable(self.path):
            raw = self._db.execute(f"SELECT {_COLUMNS} FROM blocks").fetchall()
        good: list[BlockRow] = []
        bad: list[BadRow] = []
        for r in raw:
            try:
                good.append(_row(tuple(r)))
            except (TypeError, ValueError, OverflowError) as exc:
                block_id = r[0] if isinstance(r[0], str) else None
                bad.append(BadRow(block_id, tuple(r), f"unreadable row: {exc}"))
        return good, bad

    def quarantine(self, row: BadRow | BlockRow, reason: str) -> None:
        """Move a row into the ``quarantine`` table (kept for inspection, out of the way)."""
        if isinstance(row, BlockRow):
            raw: list[object] = list(dataclasses.astuple(row))
        else:
            raw = list(row.raw)
        text = json.dumps(raw, default=str)
        with self._lock, full_disk_as(str(self.path)):
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO quarantine VALUES (?,?,?,?)", (raw[0], text, reason, time.time())
                )
                self._db.execute("DELETE FROM blocks WHERE id IS ?", (raw[0],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def quarantined(self) -> list[tuple[str | None, str]]:
        """(id, reason) of every quarantined row."""
        with self._lock:
            found = self._db.execute("SELECT id, reason FROM quarantine").fetchall()
        return [(r[0], str(r[1])) for r in found]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_rows(path: Path) -> list[BlockRow]:
    """The readable rows of a catalog database, read-only and best effort (a damaged database
    gives what SQLite can still read, or nothing): what ``vramancer memory recover`` carries
    over (pinned flags, hotness, rows of version 1 files) from a catalog it moves aside."""
    found: list[BlockRow] = []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        return found
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(blocks)").fetchall()}
        select = _COLUMNS if "durable" in columns else _COLUMNS.replace("durable", "0")
        for raw in db.execute(f"SELECT {select} FROM blocks"):
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                found.append(_row(tuple(raw)))
    except sqlite3.Error:
        pass
    finally:
        db.close()
    return found

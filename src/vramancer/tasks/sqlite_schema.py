"""The SQLite queue's schema: the tables, their indexes, migrations of older databases, and
the connection settings (WAL, page cache).

Indexes keep the hot paths O(log n) however many tasks are queued:

* ``tasks_ready``: partial index over ready tasks in dispatch order (lane, priority, expected
  run time, submission order), so taking the next tasks never scans the queue;
* ``tasks_state_seq``: history pages of one state by cursor, newest first, and the few tasks in
  back-off (``retry``) or leased (``scheduled``, ``running``) for promotion, heartbeats, expiry;
* the primary key ``seq``: history pages by cursor, newest first;
* ``tasks_user_age``: partial index over ready *user* tasks by the time they became ready, so
  the dispatcher finds the tasks that have waited longest (aging) without a scan; maintenance
  tasks do not age (they wait for idle windows by design) and do not pay for it;
* ``tasks_submitted``: turns ``since`` into a ``seq`` bound (history, and retention purges);
* ``tasks_owner_open``: a caller's tasks not ended yet (its quota, ``open_tasks``);
* ``tasks_maint_age``: ready maintenance tasks by the time they became ready (their deadline).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from vramancer.tasks.settings import Synchronous

SCHEMA_VERSION = 4
#: SQLite page cache per connection (negative: KiB).
CACHE_KIB = 65536

SCHEMA = """
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


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database of an earlier schema up to ``SCHEMA_VERSION`` (new columns; new indexes
    come from ``SCHEMA``'s ``IF NOT EXISTS``)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    if columns and version < 2 and "lease_losses" not in columns:
        conn.execute("ALTER TABLE tasks ADD COLUMN lease_losses INTEGER NOT NULL DEFAULT 0")
    if version < 3:  # version 2 aged both lanes: replaced by tasks_user_age
        conn.execute("DROP INDEX IF EXISTS tasks_ready_age")
    if columns and "owner" not in columns:  # version 4: tasks belong to their submitter
        conn.execute("ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT 'local'")


def connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    """A connection in autocommit mode (the writer opens its own transactions), WAL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.value.upper()}")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def create(conn: sqlite3.Connection) -> None:
    """Bring the database at ``conn`` to ``SCHEMA_VERSION`` (a new one: create it)."""
    migrate(conn)
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

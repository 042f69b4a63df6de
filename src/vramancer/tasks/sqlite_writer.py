"""The SQLite queue's single writer: one thread owns the write connection and *group-commits*.

Every operation waiting when it wakes runs inside one transaction (each in its own SAVEPOINT when
there are several, so one failing operation does not undo the others), then a single COMMIT
acknowledges them all.
A commit is synced only when it holds a durable operation and the mode is FULL: by SQLite
inside the COMMIT, or, with a ``WalSyncer`` (``sqlite_sync``), after it on that thread, so the
writer goes on with the next operations while the disk syncs; the durable operations are
answered after the sync, the others at once. The answers go to the event loop that waits for
them in one call per commit (``sqlite_sync.LoopAnswer``).
"""

from __future__ import annotations

import asyncio
import logging
import queue as stdqueue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vramancer.errors import BackendUnavailable, disk_full_error, is_disk_full
from vramancer.tasks.sqlite_sync import LoopAnswer, Result, WalSyncer, resolve, take_waiting

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Operations committed together at most (one transaction, one fsync).
GROUP_COMMIT_MAX = 512


class GroupCommitWriter:
    """A thread that runs write operations, many per transaction, and acknowledges after COMMIT."""

    _STOP = object()

    def __init__(
        self, conn: sqlite3.Connection, fsync: bool, syncer: WalSyncer | None = None
    ) -> None:
        self._conn = conn
        #: Whether durable operations are fsynced (``synchronous=FULL``).
        self._fsync = fsync
        #: Syncs the WAL after the commits that need it (None: SQLite syncs inside COMMIT).
        self._syncer = syncer if fsync else None
        self._synced_mode = fsync
        self._queue: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vramancer-tasks-db", daemon=True)
        self._thread.start()

    def answer_on(
        self,
        loop: asyncio.AbstractEventLoop,
        op: Callable[[sqlite3.Connection], T],
        durable: bool = True,
    ) -> asyncio.Future[T]:
        """Run ``op`` in a coming commit (``durable``: answered once it is synced); the future
        is ``loop``'s, answered with the rest of its commit in one hop."""
        answer: LoopAnswer[T] = LoopAnswer(loop)
        self._queue.put((op, answer, durable))
        return answer.future

    def stop(self) -> None:
        self._queue.put(self._STOP)
        self._thread.join(timeout=30)
        if self._syncer is not None:
            self._syncer.stop()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            batch, stop = take_waiting(self._queue, item, self._STOP, GROUP_COMMIT_MAX)
            self._commit(batch)
            if stop:
                return

    def _set_sync(self, durable: bool) -> None:
        """fsync this commit only when it holds a durable operation (and the mode is FULL),
        inside the COMMIT unless a ``WalSyncer`` syncs after it."""
        wanted = self._fsync and durable and self._syncer is None
        if wanted != self._synced_mode:
            self._conn.execute(f"PRAGMA synchronous={'FULL' if wanted else 'NORMAL'}")
            self._synced_mode = wanted

    def _commit(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], LoopAnswer[Any], bool]]
    ) -> None:
        conn = self._conn
        results: list[Result] = []
        durable: list[Result] = []
        started: list[LoopAnswer[Any]] = []
        try:
            self._set_sync(any(needs_sync for _, _, needs_sync in batch))
            # one operation alone needs no savepoint: its failure rolls back the transaction
            alone = len(batch) == 1
            conn.execute("BEGIN IMMEDIATE")
            for op, answer, needs_sync in batch:
                if not answer.set_running_or_notify_cancel():
                    continue
                started.append(answer)
                if not alone:
                    conn.execute("SAVEPOINT op")
                try:
                    result: Result = (answer, op(conn), None)
                except Exception as exc:
                    conn.execute("ROLLBACK" if alone else "ROLLBACK TO op")
                    result = (answer, None, exc)
                if not alone:
                    conn.execute("RELEASE op")
                synced_later = needs_sync and self._syncer is not None and result[2] is None
                (durable if synced_later else results).append(result)
            if conn.in_transaction:
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
            resolve([(answer, None, error) for answer in started])
            return
        if durable and self._syncer is not None:
            self._syncer.after_commit(durable)
        resolve(results)

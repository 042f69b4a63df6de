"""Durable acknowledgements off the writer thread: the WAL is synced by a thread of its own.

With ``synchronous=FULL`` a commit that holds a durable operation (a submission, a cancel, a
task's end) is acknowledged only once it is on disk. SQLite would fsync the WAL inside
``COMMIT``, on the writer thread: every operation behind it (the dispatcher's next lease, a
``running`` mark) would wait for the disk. Instead the writer commits without syncing
(``synchronous=NORMAL``), answers the operations that need no sync at once and hands the
durable ones here: this thread ``fdatasync``s the WAL file, then answers them — every group
committed before that sync started, in one sync.

Why that is the same promise: a committed transaction's frames are in the WAL file; syncing
that file after the commit is what ``FULL`` does at the commit. Frames a checkpoint copied into
the database file meanwhile were synced by that checkpoint (``NORMAL`` syncs the WAL before and
the database after each checkpoint), and SQLite restarts the WAL only after such a
checkpoint. Recovery replays the WAL's frames in order up to the first one that is missing or
damaged, so a later commit never survives without an earlier one: an operation answered without
a sync (a lease) may be lost with the durable ones before it, never kept without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue as stdqueue
import threading
from pathlib import Path
from typing import Any, Generic, TypeVar

from vramancer.errors import BackendUnavailable, disk_full_error, is_disk_full
from vramancer.files import fsync_dir

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopAnswer(Generic[T]):
    """An event loop's future for one operation run on a thread: answered with the other
    answers of its commit to the same loop in one ``call_soon_threadsafe`` (one wake-up of the
    loop per commit, not one per operation; no ``concurrent.futures.Future`` chained to it)."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        """False when the caller stopped waiting first: the operation is not run."""
        return not self.future.cancelled()


#: ``(answer, value, error)`` of one operation of a commit.
Result = tuple[LoopAnswer[Any], Any, BaseException | None]


def take_waiting(
    waiting: stdqueue.SimpleQueue[Any], first: Any, stop: object, limit: int = 1 << 30
) -> tuple[list[Any], bool]:
    """``first`` and the items that wait behind it in ``waiting`` (``limit`` in all at most),
    without blocking; and whether ``stop`` came among them (it ends the list)."""
    items = [first]
    while len(items) < limit:
        try:
            item = waiting.get_nowait()
        except stdqueue.Empty:
            break
        if item is stop:
            return items, True
        items.append(item)
    return items, False


def resolve(results: list[Result], error: BaseException | None = None) -> None:
    """Answer each operation (``error`` overrides: the commit could not be made durable); the
    answers awaited on an event loop go to it in one call."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Result]] = {}
    for answer, value, failure in results:
        by_loop.setdefault(answer.loop, []).append((answer, value, error or failure))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, answers)
        except RuntimeError:  # the loop is closed: nobody waits any more
            log.debug("%d answers dropped: their event loop is closed", len(answers))


def _settle(answers: list[Result]) -> None:
    """On the loop: set the futures still awaited."""
    for answer, value, failure in answers:
        future = answer.future
        if future.done():  # cancelled: nobody waits for it
            continue
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(value)


class WalSyncer:
    """The thread that syncs the WAL at ``wal_path`` and then answers durable operations."""

    _STOP = object()

    def __init__(self, wal_path: Path) -> None:
        self.wal_path = wal_path
        self._fd: int | None = None
        self._queue: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vramancer-tasks-sync", daemon=True)
        self._thread.start()

    def after_commit(self, results: list[Result]) -> None:
        """Answer ``results`` (committed) once the WAL is synced."""
        self._queue.put(results)

    def stop(self) -> None:
        """Sync and answer what is waiting, then end the thread (call after the writer's)."""
        self._queue.put(self._STOP)
        self._thread.join(timeout=30)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            groups, stop = take_waiting(self._queue, item, self._STOP)
            error = self._sync()
            for results in groups:
                resolve(results, error)
            if stop:
                return

    def _sync(self) -> BaseException | None:
        try:
            if self._fd is None:
                self._fd = os.open(self.wal_path, os.O_RDONLY | os.O_CLOEXEC)
                fsync_dir(self.wal_path.parent)  # the WAL file's name, once
            os.fdatasync(self._fd)
        except OSError as exc:
            log.error("syncing the task queue's WAL failed: %s", exc)
            if is_disk_full(exc):
                return disk_full_error(exc, "the task queue")
            return BackendUnavailable(f"task queue database sync failed: {exc}")
        return None

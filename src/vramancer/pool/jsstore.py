"""The JetStream queue's store: the ``vrm_tasks`` bucket (``kvbucket.Bucket``), this
orchestrator's copy of it (``mirror.TaskMirror``) kept current by a watcher and by the
store's own writes, and the compare-and-set loop every change of a task goes through.

A change is a decision on the task as read (``Decide``): the store writes what it returns
under the key's revision; a write that loses (another orchestrator wrote the task first)
re-reads the task and asks again, or gives up (``retry=False``). What the store wrote is held
in the copy at once; the watcher's later delivery of it changes nothing (``TaskMirror``
ignores revisions it has seen).

The copy is loaded from a new watcher on ``open`` and on every ``resync`` (after a
reconnect), while reads keep answering from the previous copy; this store's writes during a
reload go to both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from vramancer.errors import Conflict
from vramancer.pool import records as rec
from vramancer.pool.kvbucket import DEFAULT_MAX_VALUE, Bucket, QueueUnavailable, Value
from vramancer.pool.mirror import TaskMirror
from vramancer.pool.records import StoredTask
from vramancer.tasks.errors import PayloadTooLarge
from vramancer.tasks.model import TaskRecord
from vramancer.units import format_size

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

T = TypeVar("T")
#: A decision on a task as read: the task to write and what to answer, or None: write nothing.
Decide = Callable[[StoredTask], "tuple[StoredTask, T] | None"]
#: Writes in flight at once for one call (a batch of 100k tasks goes in slices).
CONCURRENCY = 256
#: Compare-and-set tries on one key before giving up (each lost to another writer).
CAS_TRIES = 32
#: Seconds ``open``/``resync`` waits for the watcher's next entry while loading the bucket.
LOAD_STALL_S = 30.0
#: Seconds between two tries of a ``resync`` that failed.
RESYNC_RETRY_S = 0.25


async def bounded(calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` at most ``CONCURRENCY`` at a time; their results in order."""
    pending = list(calls)
    results: list[T] = []
    for start in range(0, len(pending), CONCURRENCY):
        chunk = pending[start : start + CONCURRENCY]
        results += await asyncio.gather(*(call() for call in chunk))
    return results


@dataclass
class _Progress:
    """A load under way: whether the whole bucket arrived, and when the last entry did."""

    loaded: asyncio.Event
    last: float


class TaskStore:
    """The bucket and this orchestrator's copy of it (module docstring). ``js()`` gives the
    current JetStream context."""

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        *,
        bucket: str = "vrm_tasks",
        replicas: int = 1,
        clock_time: Callable[[], float] | None = None,
        max_value: int = DEFAULT_MAX_VALUE,
    ) -> None:
        self.bucket = Bucket(js, bucket, replicas=replicas, max_value=max_value)
        self._time = clock_time
        self.mirror = TaskMirror()
        #: Hears of every revision of a task the bucket holds: ``(before, after)``, None for
        #: a task not seen before (``before``) or deleted (``after``).
        self.on_change: Callable[[TaskRecord | None, TaskRecord | None], None] | None = None
        #: The last revision of each task told to ``on_change``.
        self.observed: dict[str, tuple[int, TaskRecord]] = {}
        #: Called once, when the first whole load is in (the counts start from it).
        self.on_loaded: Callable[[], None] | None = None
        self._observing = False
        #: The copy a ``resync`` is building (this store's writes go to both).
        self._loading: TaskMirror | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._opened = False
        #: One load at a time (``open`` and an on-connect ``resync`` may meet).
        self._load_lock = asyncio.Lock()
        #: When the copy was last loaded whole (``clock_time``; None: never, or no clock).
        self.synced_at: float | None = None

    async def open(self) -> None:
        """Create the bucket if missing and load every task."""
        if self._opened:
            return
        await self.bucket.ensure()
        await self._load()
        self._opened = True

    async def resync(self, *, retry_s: float = 0.0) -> None:
        """Watch the bucket anew and reload it (after a reconnect: the old watcher may have
        missed writes). Reads answer from the previous copy until the new one is whole.

        A server that just restarted answers JetStream requests only once it recovered its
        streams: failed tries are repeated for up to ``retry_s`` (none by default: the pool's
        connection tries a failed on-connect callback again itself, and its callbacks must
        not hold one another up). A connection lost again (the ``BackendUnavailable`` of
        ``js()``) ends it at once: the next reconnect calls it again."""
        deadline = asyncio.get_running_loop().time() + retry_s
        while True:
            try:
                await self.bucket.ensure()
                await self._load()
                return
            except QueueUnavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(RESYNC_RETRY_S)

    async def close(self) -> None:
        self._opened = False
        await self._stop_watching(self._watcher, self._consumer)
        self._watcher = self._consumer = None

    async def _load(self) -> None:
        async with self._load_lock:
            await self._load_once()

    async def _load_once(self) -> None:
        fresh = TaskMirror()
        progress = _Progress(asyncio.Event(), asyncio.get_running_loop().time())
        watcher = await self.bucket.watch()
        consumer = asyncio.create_task(self._consume(watcher, fresh, progress))
        self._loading = fresh
        try:
            await self._wait_loaded(progress)
        except BaseException:
            await self._stop_watching(watcher, consumer)
            raise
        finally:
            self._loading = None
        old = (self._watcher, self._consumer)
        self.mirror, self._watcher, self._consumer = fresh, watcher, consumer
        self.synced_at = None if self._time is None else self._time()
        await self._stop_watching(*old)
        if not self._observing:
            # The first whole load is the starting point (``on_loaded``), not a stream of
            # changes: from here on every new revision is told.
            self._observing = True
            if self.on_loaded is not None:
                self.on_loaded()

    async def _wait_loaded(self, progress: _Progress) -> None:
        """Until the watcher has delivered the whole bucket: however long that takes while
        entries keep coming (a large bucket), at most ``LOAD_STALL_S`` without one."""
        loop = asyncio.get_running_loop()
        while not progress.loaded.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.loaded.wait(), 1.0)
            if not progress.loaded.is_set() and loop.time() - progress.last > LOAD_STALL_S:
                raise QueueUnavailable(
                    f"the bucket {self.bucket.name} stopped loading: no entry for "
                    f"{LOAD_STALL_S:.0f}s"
                )

    @staticmethod
    async def _stop_watching(
        watcher: KeyValue.KeyWatcher | None, consumer: asyncio.Task[None] | None
    ) -> None:
        if consumer is not None:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        if watcher is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _consume(
        self, watcher: KeyValue.KeyWatcher, mirror: TaskMirror, progress: _Progress
    ) -> None:
        loop = asyncio.get_running_loop()
        async for entry in watcher:
            progress.last = loop.time()
            if entry is None:
                progress.loaded.set()
                continue
            data = None if entry.operation in ("DEL", "PURGE") else (entry.value or b"")
            try:
                value = Value(data, int(entry.revision or 0))
                self._apply(mirror, entry.key, value, watched=True)
                self._observe(entry.key, value, mirror)
            except Exception:  # one bad entry must not stop the copy from following the bucket
                log.exception("bucket %s: entry %s not applied", self.bucket.name, entry.key)

    def _apply(self, mirror: TaskMirror, key: str, value: Value, *, watched: bool) -> None:
        """One entry of the bucket into ``mirror`` (from the watcher, or a read)."""
        data, revision = value.data, value.revision
        if watched:
            self._mark(mirror, key, revision, deleted=data is None)
        try:
            if key.startswith(rec.TASK_PREFIX):
                task_id = rec.task_id_of(key)
                if data is None:
                    mirror.delete_task(task_id, revision)
                    if watched:  # the watcher passed the delete: older puts are behind it
                        mirror.forget_delete(task_id, revision)
                elif mirror.revisions.get(task_id, 0) < revision:  # not one of our own writes
                    mirror.put_task(rec.decode_task(data, revision), revision)
            elif key.startswith(rec.KEY_PREFIX):
                owner = None if data is None else rec.decode_key_owner(data)
                mirror.put_key(key, owner, revision)
            elif key.startswith(rec.DURATION_PREFIX):
                duration = None if data is None else rec.decode_duration(data)
                mirror.put_duration(key, duration, revision)
        except (rec.BadRecord, ValueError) as exc:
            log.warning("bucket %s: key %s skipped: %s", self.bucket.name, key, exc)

    def _observe(self, key: str, value: Value, mirror: TaskMirror) -> None:
        """Tell ``on_change`` of every revision of a task the watchers deliver, once each and
        in order (own writes included: they are told when the bucket has them), whichever
        copy's watcher delivers it first; a reload after missed writes tells the jump."""
        hook = self.on_change
        if hook is None or not key.startswith(rec.TASK_PREFIX):
            return
        task_id = rec.task_id_of(key)
        held = self.observed.get(task_id)
        if held is not None and held[0] >= value.revision:
            return
        after = None
        if value.data is not None:
            stored = mirror.tasks.get(task_id)
            if stored is None or mirror.revisions.get(task_id) != value.revision:
                stored = rec.decode_task(value.data, value.revision)
            after = stored.record
            self.observed[task_id] = (value.revision, after)
        else:
            self.observed.pop(task_id, None)
        if not self._observing:
            return
        before = held[1] if held is not None else None
        try:
            hook(before, after)
        except Exception:
            log.exception("a task change listener failed")

    def _now(self) -> float:
        return time.monotonic() if self._time is None else self._time()

    def _mark(self, mirror: TaskMirror, key: str, revision: int, *, deleted: bool) -> None:
        """Remember when the watcher delivered a key's delete marker (``sweep``)."""
        if deleted:
            mirror.markers[key] = (revision, self._now())
        else:
            mirror.markers.pop(key, None)

    async def sweep(self, *, older_than_s: float, limit: int) -> int:
        """Remove up to ``limit`` delete markers this copy received ``older_than_s`` ago or
        more: a deleted key leaves one in the stream, which every new copy would load again.
        By then every watcher has delivered it; a key written again since keeps its value
        (only the marker's revision and older go). The number removed."""
        cut = self._now() - older_than_s
        old = [(k, rev) for k, (rev, seen) in self.mirror.markers.items() if seen <= cut]
        for key, revision in old[:limit]:
            await self.bucket.forget(key, revision)
            for mirror in self.mirrors():
                if mirror.markers.get(key, (0, 0.0))[0] == revision:
                    del mirror.markers[key]
        return min(len(old), limit)

    def mirrors(self) -> list[TaskMirror]:
        return [self.mirror] if self._loading is None else [self.mirror, self._loading]

    def wrote_task(self, stored: StoredTask, revision: int) -> StoredTask:
        """Hold what this queue just wrote (``seq``: the create's revision when 0)."""
        if stored.record.seq == 0:
            stored = stored.with_record(seq=revision)
        for mirror in self.mirrors():
            mirror.put_task(stored, revision)
        return stored

    def encode(self, stored: StoredTask, *, with_seq: bool = True) -> bytes:
        data = rec.encode_task(stored, with_seq=with_seq)
        if len(data) > self.bucket.max_value:
            raise PayloadTooLarge(
                f"task {stored.task_id}: its record is {format_size(len(data))} as stored; the "
                f"bucket {self.bucket.name} takes at most {format_size(self.bucket.max_value)}",
                field="spec",
            )
        return data

    async def read(self, task_id: str) -> tuple[StoredTask, int] | None:
        """The task as the bucket holds it now (the copy is updated too)."""
        value = await self.bucket.get(rec.task_key(task_id))
        if value is None:
            return None
        for mirror in self.mirrors():
            self._apply(mirror, rec.task_key(task_id), value, watched=False)
        if value.data is None:
            return None
        return rec.decode_task(value.data, value.revision), value.revision

    async def held(self, task_id: str) -> tuple[StoredTask, int] | None:
        stored = self.mirror.get(task_id)
        if stored is not None:
            return stored, self.mirror.revisions[task_id]
        return await self.read(task_id)

    async def change(self, task_id: str, decide: Decide[T], *, retry: bool = True) -> T | None:
        """Write ``decide(task)`` under a compare-and-set; on a lost one, read the task again
        and decide again (``retry``), or give up. None: nothing written."""
        current = await self.held(task_id)
        for _ in range(CAS_TRIES):
            if current is None:
                return None
            decided = decide(current[0])
            if decided is None:
                return None
            stored, answer = decided
            revision = await self.bucket.update(
                rec.task_key(task_id), self.encode(stored), current[1]
            )
            if revision is not None:
                self.wrote_task(stored, revision)
                return answer
            if not retry:
                return None
            current = await self.read(task_id)
        raise Conflict(f"task {task_id} kept changing while being written; try again")

    async def each(self, items: Iterable[tuple[str, Decide[T]]], *, retry: bool = True) -> list[T]:
        """``change`` for several tasks at once; the answers of those written, in order."""
        calls = [partial(self.change, task_id, decide, retry=retry) for task_id, decide in items]
        return [answer for answer in await bounded(calls) if answer is not None]

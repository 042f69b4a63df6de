"""The pool's task queue on NATS JetStream: every orchestrator of the pool reads and writes the
same tasks, in the KV bucket ``vrm_tasks`` (``records``: one key per task, per idempotency key,
per learned run time).

Same ``TaskQueue`` as the embedded ``SqliteQueue``, same answers (``tasks/queue.py``):

* What becomes of a task is decided by ``tasks.transitions`` (``next_state``), from the task as
  read; the write is a compare-and-set on the key's revision, so two orchestrators never both
  apply a decision to one version of a task. A write that loses re-reads the task and decides
  again (a lease, whose grant was made on what the dispatcher saw, is skipped instead: a task
  is never leased twice).
* ``finish`` and the ``running`` mark are fenced by the lease token: a report from an attempt
  whose lease was lost (a worker cut off, then back) writes nothing.
* ``submit`` is durable once JetStream acknowledged a create-only write (``Nats-Expected-Last-
  Subject-Sequence: 0``, de-duplicated by ``Nats-Msg-Id``); ``seq`` is the revision of that
  create (monotonic across the bucket). Idempotency keys are keys of their own, created the
  same way before the tasks: the same owner's key returns its task, another owner's refuses
  the submission (what this call wrote is deleted again).
* Reads answer from an in-memory copy of the bucket (``mirror.TaskMirror``) kept current by a
  watcher and by this queue's own writes, so they cost the same at 100k tasks and answer while
  NATS is down. ``resync()`` (after every reconnect) rebuilds the copy from a new watcher.

Not one transaction across tasks: a quota (``max_open_maintenance``) is counted on this
queue's copy, so two orchestrators submitting at the same instant may each pass it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from vramancer.devices.ids import DeviceId
from vramancer.errors import Conflict
from vramancer.pool import records as rec
from vramancer.pool.kvbucket import DEFAULT_MAX_VALUE, Bucket, QueueUnavailable, Value
from vramancer.pool.mirror import TaskMirror
from vramancer.pool.records import Duration, KeyOwner, StoredTask
from vramancer.tasks.errors import IdempotencyKeyTaken, PayloadTooLarge, QuotaExceeded, TaskIdTaken
from vramancer.tasks.model import (
    LEASED_STATES,
    Change,
    Grant,
    HistoryPage,
    NewTask,
    Outcome,
    OutcomeKind,
    Submitted,
    TaskRecord,
    TaskState,
)
from vramancer.tasks.queue import Orphan, Purged
from vramancer.tasks.settings import DEFAULT_MAX_LEASE_LOSSES
from vramancer.tasks.sqlite_apply import LEASES, releases_lease, transition_change
from vramancer.tasks.transitions import TaskFacts, Transition, Trigger, next_state, no_backoff

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
#: Seconds ``open``/``resync`` waits for the watcher to deliver the whole bucket.
LOAD_TIMEOUT_S = 60.0
#: Seconds between two tries of a ``resync`` that failed.
RESYNC_RETRY_S = 0.25


def facts(r: TaskRecord) -> TaskFacts:
    return TaskFacts(
        r.state, r.attempts, r.max_retries, r.lease_losses, r.cancel_requested, r.not_before
    )


def persist(s: StoredTask, t: Transition, now: float) -> StoredTask:
    """``s`` after ``t`` (what the embedded queue's ``APPLY_SQL`` writes): leaving the leased
    states gives the lease up; back to the queue untried forgets the device (and its node)."""
    r = s.record
    unleased = releases_lease(t)
    record = replace(
        r,
        state=t.state,
        attempts=t.attempts,
        lease_losses=t.lease_losses,
        cancel_requested=t.cancel_requested,
        not_before=t.not_before,
        ready_at=r.ready_at if t.ready_at is None else t.ready_at,
        finished_at=r.finished_at if t.finished_at is None else t.finished_at,
        device=None if t.clear_device else r.device,
        node=None if t.clear_device else r.node,
        error=r.error if t.reason is None else t.reason,
    )
    return replace(
        s,
        record=record,
        worker=None if unleased else s.worker,
        lease_expires=None if unleased else s.lease_expires,
        updated_at=now,
    )


def node_of(device: str) -> str | None:
    """The node of ``NODE/gpu:N``; None for a device of this node (or not a device name)."""
    try:
        return DeviceId.parse(device).node
    except ValueError:
        return None


def new_stored(t: NewTask, now: float) -> StoredTask:
    """A submitted task as first written (``seq`` is its create's revision)."""
    spec = t.spec
    est_ms = round(t.estimate_s * 1000)
    record = TaskRecord(
        task_id=t.task_id,
        seq=0,
        type=spec.type,
        state=TaskState.QUEUED,
        priority=spec.priority,
        spec_json=t.spec_json,
        attempts=0,
        max_retries=t.max_retries,
        timeout_s=t.timeout_s,
        estimate_s=est_ms / 1000.0,
        estimate_key=t.estimate_key,
        gpu=spec.gpu,
        vram_bytes=spec.vram_bytes,
        device=None,
        lease_token=0,
        exit_code=None,
        error=None,
        submitted_at=now,
        scheduled_at=None,
        started_at=None,
        finished_at=None,
        not_before=None,
        cancel_requested=False,
        pid=None,
        idempotency_key=spec.idempotency_key,
        ready_at=now,
        owner=t.owner,
    )
    return StoredTask(record, t.maintenance, t.priority_rank, est_ms, updated_at=now)


def renamed(s: StoredTask, task_id: str) -> StoredTask:
    """``s`` under another id (an idempotency key written before its task, which never was)."""
    body = json.loads(s.record.spec_json)
    body["task_id"] = task_id
    spec_json = json.dumps(body, separators=(",", ":"))
    return s.with_record(task_id=task_id, spec_json=spec_json)


async def bounded(calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` at most ``CONCURRENCY`` at a time; their results in order."""
    pending = list(calls)
    results: list[T] = []
    for start in range(0, len(pending), CONCURRENCY):
        chunk = pending[start : start + CONCURRENCY]
        results += await asyncio.gather(*(call() for call in chunk))
    return results


@dataclass
class _Slot:
    """One submission: a task to create (``stored``), or the id it repeats (``existing``)."""

    task: NewTask
    stored: StoredTask | None = None
    existing: str | None = None
    #: For a repeat of an earlier task of the same batch: that task's slot.
    same_as: _Slot | None = None
    created: bool = False
    #: ``stored`` as its create writes it (encoded once, when planned).
    data: bytes = b""


class JetStreamQueue:
    """The ``TaskQueue`` of a pool (module docstring). ``js()`` gives the current JetStream
    context (it raises the connection's ``BackendUnavailable`` while NATS is down)."""

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        *,
        bucket: str = "vrm_tasks",
        replicas: int = 1,
        estimate_alpha: float = 0.3,
        clock_time: Callable[[], float] | None = None,
        max_value: int = DEFAULT_MAX_VALUE,
    ) -> None:
        self.bucket = Bucket(js, bucket, replicas=replicas, max_value=max_value)
        self.estimate_alpha = estimate_alpha
        self._time = clock_time
        self._mirror = TaskMirror()
        #: The copy a ``resync`` is building (this queue's writes go to both).
        self._loading: TaskMirror | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._opened = False
        #: When the copy was last loaded whole (``clock_time``; None: never, or no clock).
        self.synced_at: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the bucket if missing and load every task."""
        if self._opened:
            return
        await self.bucket.ensure()
        await self._load()
        self._opened = True

    async def resync(self, *, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        """Watch the bucket anew and reload it (after a reconnect: the old watcher may have
        missed writes). Reads answer from the previous copy until the new one is whole.

        A server that just restarted answers JetStream requests only once it recovered its
        streams: failed tries are repeated for up to ``timeout_s``. A connection lost again
        (the ``BackendUnavailable`` of ``js()``) ends it at once: the next reconnect calls
        it again."""
        deadline = asyncio.get_running_loop().time() + timeout_s
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
        fresh = TaskMirror()
        loaded = asyncio.Event()
        watcher = await self.bucket.watch()
        consumer = asyncio.create_task(self._consume(watcher, fresh, loaded))
        self._loading = fresh
        try:
            await asyncio.wait_for(loaded.wait(), LOAD_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError) as exc:
            await self._stop_watching(watcher, consumer)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise QueueUnavailable(
                f"the bucket {self.bucket.name} did not load within {LOAD_TIMEOUT_S:.0f}s"
            ) from exc
        finally:
            self._loading = None
        old = (self._watcher, self._consumer)
        self._mirror, self._watcher, self._consumer = fresh, watcher, consumer
        self.synced_at = None if self._time is None else self._time()
        await self._stop_watching(*old)

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
        self, watcher: KeyValue.KeyWatcher, mirror: TaskMirror, loaded: asyncio.Event
    ) -> None:
        async for entry in watcher:
            if entry is None:
                loaded.set()
                continue
            data = None if entry.operation in ("DEL", "PURGE") else (entry.value or b"")
            try:
                self._apply(mirror, entry.key, Value(data, int(entry.revision or 0)), watched=True)
            except Exception:  # one bad entry must not stop the copy from following the bucket
                log.exception("bucket %s: entry %s not applied", self.bucket.name, entry.key)

    def _apply(self, mirror: TaskMirror, key: str, value: Value, *, watched: bool) -> None:
        """One entry of the bucket into ``mirror`` (from the watcher, or a read)."""
        data, revision = value.data, value.revision
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

    def _mirrors(self) -> list[TaskMirror]:
        return [self._mirror] if self._loading is None else [self._mirror, self._loading]

    def _wrote_task(self, stored: StoredTask, revision: int) -> StoredTask:
        """Hold what this queue just wrote (``seq``: the create's revision when 0)."""
        if stored.record.seq == 0:
            stored = stored.with_record(seq=revision)
        for mirror in self._mirrors():
            mirror.put_task(stored, revision)
        return stored

    # -- compare-and-set -----------------------------------------------------------------------

    def _encode(self, stored: StoredTask, *, with_seq: bool = True) -> bytes:
        data = rec.encode_task(stored, with_seq=with_seq)
        if len(data) > self.bucket.max_value:
            raise PayloadTooLarge(
                f"task {stored.task_id}: its record is {len(data)} bytes as stored; the bucket "
                f"{self.bucket.name} takes at most {self.bucket.max_value}",
                field="spec",
            )
        return data

    async def _read(self, task_id: str) -> tuple[StoredTask, int] | None:
        """The task as the bucket holds it now (the copy is updated too)."""
        value = await self.bucket.get(rec.task_key(task_id))
        if value is None:
            return None
        for mirror in self._mirrors():
            self._apply(mirror, rec.task_key(task_id), value, watched=False)
        if value.data is None:
            return None
        return rec.decode_task(value.data, value.revision), value.revision

    async def _held(self, task_id: str) -> tuple[StoredTask, int] | None:
        stored = self._mirror.get(task_id)
        if stored is not None:
            return stored, self._mirror.revisions[task_id]
        return await self._read(task_id)

    async def _change(self, task_id: str, decide: Decide[T], *, retry: bool = True) -> T | None:
        """Write ``decide(task)`` under a compare-and-set; on a lost one, read the task again
        and decide again (``retry``), or give up. None: nothing written."""
        current = await self._held(task_id)
        for _ in range(CAS_TRIES):
            if current is None:
                return None
            decided = decide(current[0])
            if decided is None:
                return None
            stored, answer = decided
            revision = await self.bucket.update(
                rec.task_key(task_id), self._encode(stored), current[1]
            )
            if revision is not None:
                self._wrote_task(stored, revision)
                return answer
            if not retry:
                return None
            current = await self._read(task_id)
        raise Conflict(f"task {task_id} kept changing while being written; try again")

    async def _each(self, items: Iterable[tuple[str, Decide[T]]], *, retry: bool = True) -> list[T]:
        """``_change`` for several tasks at once; the answers of those written, in order."""
        calls = [partial(self._change, task_id, decide, retry=retry) for task_id, decide in items]
        return [answer for answer in await bounded(calls) if answer is not None]

    # -- submit --------------------------------------------------------------------------------

    async def submit(
        self, tasks: Sequence[NewTask], now: float, *, max_open_maintenance: int | None = None
    ) -> tuple[list[Submitted], list[Change]]:
        slots = self._plan(tasks, now)
        self._check_quota(tasks, slots, max_open_maintenance)
        fresh = [s for s in slots if s.stored is not None]
        keys: list[tuple[str, int]] = []
        try:
            keys = await self._create_keys(fresh)
            await self._create_tasks([s for s in fresh if s.stored is not None])
        except (IdempotencyKeyTaken, TaskIdTaken):
            await self._undo(keys, [s for s in fresh if s.created])
            raise
        results, changes = [], []
        for slot in slots:
            task_id = self._resolve(slot)
            results.append(Submitted(task_id, slot.created))
            if slot.created:
                changes.append(Change(task_id, None, TaskState.QUEUED, 0, type=slot.task.spec.type))
        return results, changes

    @staticmethod
    def _resolve(slot: _Slot) -> str:
        if slot.same_as is not None:
            return JetStreamQueue._resolve(slot.same_as)
        if slot.existing is not None:
            return slot.existing
        assert slot.stored is not None
        return slot.stored.task_id

    def _plan(self, tasks: Sequence[NewTask], now: float) -> list[_Slot]:
        """What to write for each submission, from this queue's copy: the known keys and ids
        of the same owner are repeats, another owner's refuse the whole submission."""
        by_key: dict[str, _Slot] = {}
        by_id: dict[str, _Slot] = {}
        slots = []
        for t in tasks:
            slot = _Slot(t)
            repeat = self._repeat(t, by_key, by_id)
            if isinstance(repeat, _Slot):
                slot.same_as = repeat
            elif repeat is not None:
                slot.existing = repeat
            else:
                slot.stored = new_stored(t, now)
                # encoded (and bounded) before anything is written
                slot.data = self._encode(slot.stored, with_seq=False)
                if t.spec.idempotency_key is not None:
                    by_key[t.spec.idempotency_key] = slot
                by_id[t.task_id] = slot
            slots.append(slot)
        return slots

    def _repeat(
        self, t: NewTask, by_key: dict[str, _Slot], by_id: dict[str, _Slot]
    ) -> _Slot | str | None:
        """What ``t`` repeats (same owner): a task of this batch, a known task id, or None
        (the embedded queue's order: the key, then the id; this batch, then the copy)."""
        key = t.spec.idempotency_key
        if key is not None:
            if key in by_key:
                self._same_owner(t, by_key[key].task.owner, by_key=True)
                return by_key[key]
            held = self._mirror.keys.get(rec.idempotency_key(key))
            if held is not None:
                self._same_owner(t, held[0].owner, by_key=True)
                if held[0].task_id in self._mirror.tasks:
                    return held[0].task_id
                # its task is not here (yet): the key's create settles it (``_key_taken``)
        if t.task_id in by_id:
            self._same_owner(t, by_id[t.task_id].task.owner, by_key=False)
            return by_id[t.task_id]
        stored = self._mirror.get(t.task_id)
        if stored is not None:
            self._same_owner(t, stored.record.owner, by_key=False)
            return t.task_id
        return None

    @staticmethod
    def _same_owner(t: NewTask, owner: str, *, by_key: bool) -> None:
        if owner == t.owner:
            return
        if by_key:
            raise IdempotencyKeyTaken(
                f"idempotency_key {t.spec.idempotency_key!r} is already used by another "
                "caller's task; choose another key",
                field="idempotency_key",
            )
        raise TaskIdTaken(
            f"task_id {t.task_id!r} is already used by another caller's task; choose another id",
            field="task_id",
        )

    def _check_quota(
        self, tasks: Sequence[NewTask], slots: Sequence[_Slot], max_open: int | None
    ) -> None:
        new = sum(1 for s in slots if s.stored is not None and s.task.maintenance)
        if max_open is None or new == 0:
            return
        open_now = self._mirror.open_maintenance(tasks[0].owner)
        if open_now + new > max_open:
            raise QuotaExceeded(
                f"{open_now} maintenance task(s) of this caller have not ended yet and {new} more "
                f"were submitted; a viewer may have at most {max_open} "
                "([tasks] viewer_max_queued)",
                queued=open_now,
                limit=max_open,
            )

    async def _create_keys(self, slots: Sequence[_Slot]) -> list[tuple[str, int]]:
        """Create the idempotency keys of ``slots`` (the tasks to create); a key that exists
        already turns its slot into a repeat of that key's task. The keys created, with their
        revisions (to undo them)."""
        keyed = [s for s in slots if s.task.spec.idempotency_key is not None]
        names = [rec.idempotency_key(s.task.spec.idempotency_key or "") for s in keyed]
        values = [rec.encode_key_owner(KeyOwner(s.task.task_id, s.task.owner)) for s in keyed]
        revisions = await bounded(
            partial(self.bucket.create, n, v, n) for n, v in zip(names, values, strict=True)
        )
        created = [(n, r) for n, r in zip(names, revisions, strict=True) if r is not None]
        for name, revision, slot in zip(names, revisions, keyed, strict=True):
            if revision is not None:
                owner = KeyOwner(slot.task.task_id, slot.task.owner)
                for mirror in self._mirrors():
                    mirror.put_key(name, owner, revision)
        for name, revision, slot in zip(names, revisions, keyed, strict=True):
            if revision is None:
                try:
                    await self._key_taken(slot, name)
                except IdempotencyKeyTaken:
                    await self._undo(created, [])
                    raise
        return created

    async def _key_taken(self, slot: _Slot, name: str) -> None:
        """``slot``'s key exists: a repeat of its task (same owner), or refused."""
        value = await self.bucket.get(name)
        if value is None or value.data is None:  # deleted meanwhile: the submission is new
            raise QueueUnavailable(f"idempotency key {name} changed while being written; try again")
        held = rec.decode_key_owner(value.data)
        self._same_owner(slot.task, held.owner, by_key=True)
        assert slot.stored is not None
        if await self._held(held.task_id) is not None:
            slot.stored, slot.existing = None, held.task_id
        elif held.task_id != slot.task.task_id:  # its task was never written: write it now
            slot.stored = renamed(slot.stored, held.task_id)
            slot.data = self._encode(slot.stored, with_seq=False)

    async def _create_tasks(self, slots: Sequence[_Slot]) -> None:
        """Create the tasks of ``slots``; an id that exists already is a repeat of that task
        (same owner) or refuses the submission."""

        async def create(slot: _Slot) -> None:
            assert slot.stored is not None
            key = rec.task_key(slot.stored.task_id)
            data = slot.data
            revision = await self.bucket.create(key, data, key)
            if revision is not None:
                slot.stored = self._wrote_task(slot.stored, revision)
                slot.created = True
                return
            task_id = slot.stored.task_id
            held = await self._read(task_id)
            if held is not None:
                self._same_owner(slot.task, held[0].record.owner, by_key=False)
            slot.stored, slot.existing = None, task_id

        results = await bounded(partial(self._catching, create, s) for s in slots)
        for error in results:
            if error is not None:
                raise error

    @staticmethod
    async def _catching(
        create: Callable[[_Slot], Awaitable[None]], slot: _Slot
    ) -> TaskIdTaken | None:
        try:
            await create(slot)
        except TaskIdTaken as exc:
            return exc
        return None

    async def _undo(self, keys: Sequence[tuple[str, int]], slots: Sequence[_Slot]) -> None:
        """Delete what a refused submission wrote (keys, then tasks), best effort."""
        for name, revision in keys:
            deleted = await self.bucket.delete(name, revision)
            if deleted is not None:
                for mirror in self._mirrors():
                    mirror.put_key(name, None, deleted)
        for slot in slots:
            assert slot.stored is not None
            key = rec.task_key(slot.stored.task_id)
            deleted = await self.bucket.delete(
                key, self._mirror.revisions.get(slot.stored.task_id, 0)
            )
            if deleted is not None:
                for mirror in self._mirrors():
                    mirror.delete_task(slot.stored.task_id, deleted)
            slot.created = False

    # -- reads ---------------------------------------------------------------------------------

    async def open_tasks(self, owner: str, *, limit: int) -> list[TaskRecord]:
        return self._mirror.open_tasks(owner, limit)

    async def overdue_maintenance(self, *, ready_before: float, limit: int) -> list[TaskRecord]:
        return self._mirror.overdue(True, ready_before, limit)

    async def ready(self, *, maintenance: bool, limit: int, offset: int = 0) -> list[TaskRecord]:
        return self._mirror.ready_page(maintenance, limit, offset)

    async def dispatch_view(
        self, *, limit: int, overdue_before: float | None, overdue_limit: int
    ) -> tuple[list[TaskRecord], list[TaskRecord]]:
        page = self._mirror.ready_page(False, limit) if limit > 0 else []
        overdue = []
        if overdue_before is not None:
            overdue = self._mirror.overdue(False, overdue_before, overdue_limit)
        return page, overdue

    async def get(self, task_id: str) -> TaskRecord | None:
        stored = self._mirror.get(task_id)
        return None if stored is None else stored.record

    async def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        found = {}
        for task_id in task_ids:
            stored = self._mirror.get(task_id)
            if stored is not None:
                found[task_id] = stored.state
        return found

    async def history(
        self,
        *,
        state: TaskState | None,
        since: float | None,
        cursor: str | None,
        limit: int,
    ) -> HistoryPage:
        return self._mirror.history(state, since, cursor, limit)

    async def counts(self) -> dict[tuple[bool, TaskState], int]:
        return dict(self._mirror.count)

    async def learned_durations(self) -> dict[str, float]:
        return {d.key: d.mean_s for d, _ in self._mirror.durations.values()}

    # -- dispatch ------------------------------------------------------------------------------

    async def lease(
        self, grants: Sequence[Grant], *, worker: str, now: float, lease_s: float
    ) -> tuple[list[TaskRecord], list[Change]]:
        """Lease each granted task still ready; a grant whose task changed since it was read
        (another orchestrator wrote it first) is skipped, never leased twice."""

        def decide(grant: Grant) -> Decide[tuple[TaskRecord, Change]]:
            def lease_one(s: StoredTask) -> tuple[StoredTask, tuple[TaskRecord, Change]] | None:
                r = s.record
                t = next_state(facts(r), LEASES[grant.running], now, no_backoff)
                if t.ignored:
                    return None
                leased = replace(
                    s,
                    record=replace(
                        r,
                        state=t.state,
                        attempts=t.attempts,
                        not_before=t.not_before,
                        started_at=t.started_at,
                        lease_token=r.lease_token + 1,
                        device=grant.device,
                        node=node_of(grant.device),
                        scheduled_at=now,
                        exit_code=None,
                        error=None,
                        pid=None,
                    ),
                    worker=worker,
                    lease_expires=now + lease_s,
                    pid_started=None,
                    updated_at=now,
                )
                wait = max(0.0, now - (r.ready_at or now)) if t.started_at else None
                change = Change(
                    r.task_id,
                    grant.previous,
                    t.state,
                    t.attempts,
                    grant.device,
                    wait_s=wait,
                    type=r.type,
                )
                return leased, (leased.record, change)

            return lease_one

        done = await self._each(((g.task_id, decide(g)) for g in grants), retry=False)
        return [record for record, _ in done], [change for _, change in done]

    async def mark_running(
        self,
        task_id: str,
        lease_token: int,
        *,
        pid: int | None,
        pid_started: float | None,
        now: float,
    ) -> list[Change]:
        def start(s: StoredTask) -> tuple[StoredTask, Change] | None:
            r = s.record
            if r.lease_token != lease_token:
                return None
            t = next_state(facts(r), Trigger.START, now, no_backoff)
            if t.ignored:
                return None
            started = replace(
                s,
                record=replace(
                    r,
                    state=t.state,
                    attempts=t.attempts,
                    started_at=r.started_at if t.started_at is None else t.started_at,
                    pid=pid,
                ),
                pid_started=pid_started,
                updated_at=now,
            )
            wait = max(0.0, now - (r.ready_at or now))
            change = Change(
                task_id, t.previous, t.state, t.attempts, r.device, wait_s=wait, type=r.type
            )
            return started, change

        change = await self._change(task_id, start)
        return [] if change is None else [change]

    async def set_waiting(
        self, reasons: Sequence[tuple[str, str, TaskState]], now: float
    ) -> list[Change]:
        def wait(why: str, seen: TaskState) -> Decide[Change | None]:
            def decide(s: StoredTask) -> tuple[StoredTask, Change | None] | None:
                r = s.record
                if r.state is not seen or r.error == why:
                    return None
                t = next_state(facts(r), Trigger.WAIT, now, no_backoff)
                if t.ignored:
                    return None
                waiting = replace(
                    s,
                    record=replace(r, state=t.state, attempts=t.attempts, error=why),
                    updated_at=now,
                )
                change = (
                    Change(r.task_id, t.previous, t.state, t.attempts, error=why, type=r.type)
                    if t.changed
                    else None
                )
                return waiting, change

            return decide

        done = await self._each((task_id, wait(why, seen)) for task_id, why, seen in reasons)
        return [change for change in done if change is not None]

    async def heartbeat(self, worker: str, *, now: float, lease_s: float) -> int:
        def extend(s: StoredTask) -> tuple[StoredTask, bool] | None:
            if s.worker != worker or s.state not in LEASED_STATES:
                return None
            return replace(s, lease_expires=now + lease_s), True

        held = [s.task_id for s in self._mirror.held_by(worker)]
        return len(await self._each((task_id, extend) for task_id in held))

    # -- outcomes ------------------------------------------------------------------------------

    async def finish(
        self, outcomes: Sequence[Outcome], *, now: float, retry_delay: Callable[[int], float]
    ) -> list[Change]:
        def end(outcome: Outcome) -> Decide[Change]:
            def decide(s: StoredTask) -> tuple[StoredTask, Change] | None:
                r = s.record
                if r.lease_token != outcome.lease_token:
                    return None  # a stale report: the task was leased again since
                t = next_state(facts(r), Trigger.of(outcome.kind), now, retry_delay)
                if t.ignored:
                    return None  # a repeated report: the task already moved on
                # ``ok`` with no cancel asked clears the error (the embedded queue's fast path)
                error = (
                    None
                    if outcome.kind is OutcomeKind.OK and not r.cancel_requested
                    else outcome.error
                )
                ended = persist(s, t, now).with_record(
                    exit_code=outcome.exit_code,
                    error=error,
                    stdout_tail=outcome.stdout_tail,
                    stderr_tail=outcome.stderr_tail,
                )
                change = Change(
                    r.task_id,
                    t.previous,
                    t.state,
                    t.attempts,
                    r.device,
                    exit_code=outcome.exit_code,
                    error=error,
                    run_s=outcome.run_s if outcome.kind is not OutcomeKind.RELEASED else None,
                    type=r.type,
                    estimate_key=r.estimate_key if t.state is TaskState.DONE else None,
                )
                return ended, change

            return decide

        changes = await self._each((o.task_id, end(o)) for o in outcomes)
        await self._learn(changes)
        return changes

    async def _learn(self, changes: Sequence[Change]) -> None:
        """Fold the run times of the tasks that ended done into the moving average per
        command (one compare-and-set per command, however many tasks ended)."""
        runs: dict[str, list[float]] = {}
        for change in changes:
            if change.state is TaskState.DONE and change.estimate_key and change.run_s is not None:
                runs.setdefault(change.estimate_key, []).append(change.run_s)
        for key, values in runs.items():
            await self._learn_one(key, values)

    async def _learn_one(self, estimate_key: str, values: Sequence[float]) -> None:
        name = rec.duration_key(estimate_key)
        held = self._mirror.durations.get(name)
        for _ in range(CAS_TRIES):
            mean, n = (None, 0) if held is None else (held[0].mean_s, held[0].n)
            for value in values:
                mean = value if mean is None else mean + self.estimate_alpha * (value - mean)
            assert mean is not None
            duration = Duration(estimate_key, mean, n + len(values))
            data = rec.encode_duration(duration)
            if held is None:
                revision = await self.bucket.create(name, data, None)
            else:
                revision = await self.bucket.update(name, data, held[1])
            if revision is not None:
                for mirror in self._mirrors():
                    mirror.put_duration(name, duration, revision)
                return
            value_now = await self.bucket.get(name)
            held = None
            if value_now is not None and value_now.data is not None:
                held = (rec.decode_duration(value_now.data), value_now.revision)
        log.warning("learned run time of %s not saved: too many concurrent writers", estimate_key)

    async def cancel(self, task_id: str, now: float) -> tuple[TaskRecord | None, list[Change]]:
        def decide(s: StoredTask) -> tuple[StoredTask, Change | None] | None:
            t = next_state(facts(s.record), Trigger.CANCEL, now, no_backoff)
            if t.ignored:
                return None
            r = s.record
            change = transition_change(task_id, t, r.type, r.device) if t.changed else None
            return persist(s, t, now), change

        change = await self._change(task_id, decide)
        held = await self._held(task_id)
        if held is None:
            return None, []
        return held[0].record, [] if change is None else [change]

    async def promote_due(self, now: float) -> list[Change]:
        def decide(s: StoredTask) -> tuple[StoredTask, Change] | None:
            t = next_state(facts(s.record), Trigger.DUE, now, no_backoff)
            if not t.changed:
                return None
            return persist(s, t, now), transition_change(s.task_id, t, s.record.type)

        due = [
            s.task_id
            for s in self._mirror.in_state(TaskState.RETRY)
            if s.record.not_before is not None and s.record.not_before <= now
        ]
        return await self._each((task_id, decide) for task_id in due)

    async def expire_leases(
        self,
        now: float,
        *,
        all_leases: bool = False,
        max_lease_losses: int = DEFAULT_MAX_LEASE_LOSSES,
    ) -> tuple[list[Change], list[Orphan]]:
        """Take back leases past their expiry (every lease: ``all_leases``), as the embedded
        queue does: queued again, cancelled, or failed after ``max_lease_losses``; the process
        the lost attempt started is reported."""

        def expired(s: StoredTask) -> bool:
            if s.state not in LEASED_STATES:
                return False
            return all_leases or (s.lease_expires is not None and s.lease_expires < now)

        def decide(s: StoredTask) -> tuple[StoredTask, tuple[Change, Orphan | None]] | None:
            if not expired(s):
                return None
            r = s.record
            t = next_state(
                facts(r), Trigger.LEASE_LOST, now, no_backoff, max_lease_losses=max_lease_losses
            )
            orphan = None if r.pid is None else Orphan(r.task_id, r.pid, s.pid_started)
            return persist(s, t, now), (transition_change(r.task_id, t, r.type, r.device), orphan)

        leased = self._mirror.in_state(TaskState.SCHEDULED, TaskState.RUNNING)
        done = await self._each((s.task_id, decide) for s in leased if expired(s))
        return [c for c, _ in done], [o for _, o in done if o is not None]

    async def purge(self, *, ended_before: float, limit: int) -> list[Purged]:
        """Delete up to ``limit`` tasks that ended before ``ended_before`` (and their
        idempotency keys); never the newest task, as the embedded queue."""
        candidates = self._mirror.purgeable(ended_before, limit)
        found = await bounded(partial(self._purge_one, s) for s in candidates)
        return [p for p in found if p is not None]

    async def _purge_one(self, s: StoredTask) -> Purged | None:
        r = s.record
        revision = self._mirror.revisions.get(r.task_id)
        if revision is None:
            return None
        deleted = await self.bucket.delete(rec.task_key(r.task_id), revision)
        if deleted is None:
            return None  # changed since it was read: kept
        for mirror in self._mirrors():
            mirror.delete_task(r.task_id, deleted)
        if r.idempotency_key is not None:
            await self._drop_key(rec.idempotency_key(r.idempotency_key), r.task_id)
        return Purged(r.task_id, r.attempts, s.maintenance, r.state)

    async def _drop_key(self, name: str, task_id: str) -> None:
        held = self._mirror.keys.get(name)
        if held is None or held[0].task_id != task_id:
            return
        deleted = await self.bucket.delete(name, held[1])
        if deleted is not None:
            for mirror in self._mirrors():
                mirror.put_key(name, None, deleted)

    def __repr__(self) -> str:
        return f"JetStreamQueue(bucket={self.bucket.name!r}, tasks={len(self._mirror.tasks)})"

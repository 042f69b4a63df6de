"""Submissions to the JetStream queue: the same answers as the embedded queue's
(``tasks/sqlite_submit.py``) without a transaction across keys.

A task becomes durable by a create-only write of its key (``t.<id>``, de-duplicated by
``Nats-Msg-Id``). An idempotency key is a key of its own (``k.<sha256>``, naming the task and
its owner), created before the task: whoever creates it first owns the key, and a repeat (the
same owner) is answered with that key's task. Another owner's key or task id refuses the whole
submission, checked first on this orchestrator's copy (nothing is written), else found by the
writes themselves (what this submission wrote is deleted again). A key whose task was never
written (its writer died in between) gets its task written by the repeat.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from vramancer.pool import records as rec
from vramancer.pool.jsstore import TaskStore, bounded
from vramancer.pool.kvbucket import QueueUnavailable
from vramancer.pool.records import KeyOwner, StoredTask
from vramancer.tasks.errors import IdempotencyKeyTaken, QuotaExceeded, TaskIdTaken
from vramancer.tasks.model import Change, NewTask, Submitted, TaskRecord, TaskState


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


async def submit(
    store: TaskStore, tasks: Sequence[NewTask], now: float, max_open_maintenance: int | None
) -> tuple[list[Submitted], list[Change]]:
    """Create the new tasks of ``tasks`` (module docstring); the answer per submission, and
    the changes of the tasks created."""
    slots = _plan(store, tasks, now)
    _check_quota(store, tasks, slots, max_open_maintenance)
    fresh = [s for s in slots if s.stored is not None]
    keys: list[tuple[str, int]] = []
    try:
        keys = await _create_keys(store, fresh)
        await _create_tasks(store, [s for s in fresh if s.stored is not None])
    except (IdempotencyKeyTaken, TaskIdTaken):
        await _undo(store, keys, [s for s in fresh if s.created])
        raise
    results, changes = [], []
    for slot in slots:
        task_id = _resolve(slot)
        results.append(Submitted(task_id, slot.created))
        if slot.created:
            changes.append(Change(task_id, None, TaskState.QUEUED, 0, type=slot.task.spec.type))
    return results, changes


def _resolve(slot: _Slot) -> str:
    if slot.same_as is not None:
        return _resolve(slot.same_as)
    if slot.existing is not None:
        return slot.existing
    assert slot.stored is not None
    return slot.stored.task_id


def _plan(store: TaskStore, tasks: Sequence[NewTask], now: float) -> list[_Slot]:
    """What to write for each submission, from this queue's copy: the known keys and ids
    of the same owner are repeats, another owner's refuse the whole submission."""
    by_key: dict[str, _Slot] = {}
    by_id: dict[str, _Slot] = {}
    slots = []
    for t in tasks:
        slot = _Slot(t)
        repeat = _repeat(store, t, by_key, by_id)
        if isinstance(repeat, _Slot):
            slot.same_as = repeat
        elif repeat is not None:
            slot.existing = repeat
        else:
            slot.stored = new_stored(t, now)
            # encoded (and bounded) before anything is written
            slot.data = store.encode(slot.stored, with_seq=False)
            if t.spec.idempotency_key is not None:
                by_key[t.spec.idempotency_key] = slot
            by_id[t.task_id] = slot
        slots.append(slot)
    return slots


def _repeat(
    store: TaskStore, t: NewTask, by_key: dict[str, _Slot], by_id: dict[str, _Slot]
) -> _Slot | str | None:
    """What ``t`` repeats (same owner): a task of this batch, a known task id, or None
    (the embedded queue's order: the key, then the id; this batch, then the copy)."""
    key = t.spec.idempotency_key
    if key is not None:
        if key in by_key:
            _same_owner(t, by_key[key].task.owner, by_key=True)
            return by_key[key]
        held = store.mirror.keys.get(rec.idempotency_key(key))
        if held is not None:
            _same_owner(t, held[0].owner, by_key=True)
            if held[0].task_id in store.mirror.tasks:
                return held[0].task_id
            # its task is not here (yet): the key's create settles it (``_key_taken``)
    if t.task_id in by_id:
        _same_owner(t, by_id[t.task_id].task.owner, by_key=False)
        return by_id[t.task_id]
    stored = store.mirror.get(t.task_id)
    if stored is not None:
        _same_owner(t, stored.record.owner, by_key=False)
        return t.task_id
    return None


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
    store: TaskStore, tasks: Sequence[NewTask], slots: Sequence[_Slot], max_open: int | None
) -> None:
    new = sum(1 for s in slots if s.stored is not None and s.task.maintenance)
    if max_open is None or new == 0:
        return
    open_now = store.mirror.open_maintenance(tasks[0].owner)
    if open_now + new > max_open:
        raise QuotaExceeded(
            f"{open_now} maintenance task(s) of this caller have not ended yet and {new} more "
            f"were submitted; a viewer may have at most {max_open} "
            "([tasks] viewer_max_queued)",
            queued=open_now,
            limit=max_open,
        )


async def _create_keys(store: TaskStore, slots: Sequence[_Slot]) -> list[tuple[str, int]]:
    """Create the idempotency keys of ``slots`` (the tasks to create); a key that exists
    already turns its slot into a repeat of that key's task. The keys created, with their
    revisions (to undo them)."""
    keyed = [s for s in slots if s.task.spec.idempotency_key is not None]
    names = [rec.idempotency_key(s.task.spec.idempotency_key or "") for s in keyed]
    values = [rec.encode_key_owner(KeyOwner(s.task.task_id, s.task.owner)) for s in keyed]
    revisions = await bounded(
        partial(store.bucket.create, n, v, n) for n, v in zip(names, values, strict=True)
    )
    created = [(n, r) for n, r in zip(names, revisions, strict=True) if r is not None]
    for name, revision, slot in zip(names, revisions, keyed, strict=True):
        if revision is not None:
            owner = KeyOwner(slot.task.task_id, slot.task.owner)
            for mirror in store.mirrors():
                mirror.put_key(name, owner, revision)
    for name, revision, slot in zip(names, revisions, keyed, strict=True):
        if revision is None:
            try:
                await _key_taken(store, slot, name)
            except IdempotencyKeyTaken:
                await _undo(store, created, [])
                raise
    return created


async def _key_taken(store: TaskStore, slot: _Slot, name: str) -> None:
    """``slot``'s key exists: a repeat of its task (same owner), or refused."""
    value = await store.bucket.get(name)
    if value is None or value.data is None:  # deleted meanwhile: the submission is new
        raise QueueUnavailable(f"idempotency key {name} changed while being written; try again")
    held = rec.decode_key_owner(value.data)
    _same_owner(slot.task, held.owner, by_key=True)
    assert slot.stored is not None
    if await store.held(held.task_id) is not None:
        slot.stored, slot.existing = None, held.task_id
    elif held.task_id != slot.task.task_id:  # its task was never written: write it now
        slot.stored = renamed(slot.stored, held.task_id)
        slot.data = store.encode(slot.stored, with_seq=False)


async def _create_tasks(store: TaskStore, slots: Sequence[_Slot]) -> None:
    """Create the tasks of ``slots``; an id that exists already is a repeat of that task
    (same owner) or refuses the submission."""

    async def create(slot: _Slot) -> None:
        assert slot.stored is not None
        key = rec.task_key(slot.stored.task_id)
        data = slot.data
        revision = await store.bucket.create(key, data, key)
        if revision is not None:
            slot.stored = store.wrote_task(slot.stored, revision)
            slot.created = True
            return
        task_id = slot.stored.task_id
        held = await store.read(task_id)
        if held is not None:
            _same_owner(slot.task, held[0].record.owner, by_key=False)
        slot.stored, slot.existing = None, task_id

    results = await bounded(partial(_catching, create, s) for s in slots)
    for error in results:
        if error is not None:
            raise error


async def _catching(create: Callable[[_Slot], Awaitable[None]], slot: _Slot) -> TaskIdTaken | None:
    try:
        await create(slot)
    except TaskIdTaken as exc:
        return exc
    return None


async def _undo(store: TaskStore, keys: Sequence[tuple[str, int]], slots: Sequence[_Slot]) -> None:
    """Delete what a refused submission wrote (keys, then tasks), best effort."""
    for name, revision in keys:
        deleted = await store.bucket.delete(name, revision)
        if deleted is not None:
            for mirror in store.mirrors():
                mirror.put_key(name, None, deleted)
    for slot in slots:
        assert slot.stored is not None
        key = rec.task_key(slot.stored.task_id)
        deleted = await store.bucket.delete(key, store.mirror.revisions.get(slot.stored.task_id, 0))
        if deleted is not None:
            for mirror in store.mirrors():
                mirror.delete_task(slot.stored.task_id, deleted)
        slot.created = False

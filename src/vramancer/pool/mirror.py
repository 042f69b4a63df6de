"""The JetStream queue's reads: an in-memory copy of the ``vrm_tasks`` bucket with the indexes
the embedded queue keeps in SQLite, so every read is a dictionary look-up or a range of a
sorted list, whatever the number of tasks.

The copy is fed by the bucket's watcher and by the queue's own writes (at once, from each
write's result); an entry older than the one held (a lower revision) is ignored, so a watcher
that delivers a write after the queue applied it changes nothing. Pure: no I/O.

Indexes (each the order of the embedded queue's SQL):

* ready tasks per lane in dispatch order: priority (highest first), expected run time in ms,
  then ``seq`` (``ORDER BY prio DESC, est_ms, seq``);
* ready tasks per lane by the time they became ready, then ``seq`` (aging, deadlines);
* every task by ``seq`` and per state by ``seq`` (history pages by cursor, purges, and the few
  tasks in back-off or leased: promotion, expiry);
* tasks by ``submitted_at`` (``since`` bounds), a caller's tasks not ended per lane (quota,
  ``open_tasks``), the leased tasks per worker (heartbeats), and counts per lane and state.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from typing import Any, Generic, TypeVar

from vramancer.pool.records import Duration, KeyOwner, StoredTask
from vramancer.tasks.model import LEASED_STATES, READY_STATES, HistoryPage, TaskRecord, TaskState

K = TypeVar("K", bound=tuple[Any, ...])
ENDED_STATES = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class SortedKeys(Generic[K]):
    """A sorted collection of unique tuples, held as a list of sorted chunks of at most
    ``2 * chunk`` items and the greatest item of each: adding or removing one is a bisection
    and a move within one chunk, whatever the size (one sorted list would move up to every
    item behind the change: 100k pointers for the task at the head of the queue)."""

    __slots__ = ("_chunk", "_chunks", "_len", "_maxes")

    def __init__(self, chunk: int = 512) -> None:
        self._chunk = chunk
        self._chunks: list[list[K]] = []
        self._maxes: list[K] = []
        self._len = 0

    def add(self, item: K) -> None:
        if not self._chunks:
            self._chunks.append([item])
            self._maxes.append(item)
            self._len = 1
            return
        i = bisect_left(self._maxes, item)
        if i == len(self._maxes):  # past the greatest: the last chunk grows
            i -= 1
            self._chunks[i].append(item)
            self._maxes[i] = item
        else:
            insort(self._chunks[i], item)
        self._len += 1
        if len(self._chunks[i]) > 2 * self._chunk:
            self._split(i)

    def _split(self, i: int) -> None:
        chunk = self._chunks[i]
        tail = chunk[self._chunk :]
        del chunk[self._chunk :]
        self._chunks.insert(i + 1, tail)
        self._maxes[i] = chunk[-1]
        self._maxes.insert(i + 1, tail[-1])

    def discard(self, item: K) -> None:
        i = bisect_left(self._maxes, item)
        if i == len(self._maxes):
            return
        chunk = self._chunks[i]
        j = bisect_left(chunk, item)
        if j == len(chunk) or chunk[j] != item:
            return
        del chunk[j]
        self._len -= 1
        if not chunk:
            del self._chunks[i]
            del self._maxes[i]
        elif j == len(chunk):
            self._maxes[i] = chunk[-1]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        for chunk in self._chunks:
            yield from chunk

    def __reversed__(self) -> Iterator[K]:
        for chunk in reversed(self._chunks):
            yield from reversed(chunk)

    def last(self) -> K | None:
        return self._maxes[-1] if self._maxes else None

    def from_index(self, start: int) -> Iterator[K]:
        """The items from position ``start`` on (a walk over the chunks to find it)."""
        for chunk in self._chunks:
            if start >= len(chunk):
                start -= len(chunk)
                continue
            yield from chunk[start:] if start else chunk
            start = 0

    def below(self, bound: tuple[Any, ...]) -> Iterator[K]:
        """Items less than ``bound``, the greatest first."""
        i = bisect_left(self._maxes, bound)
        if i < len(self._chunks):
            chunk = self._chunks[i]
            yield from reversed(chunk[: bisect_left(chunk, bound)])
        for chunk in reversed(self._chunks[: min(i, len(self._chunks))]):
            yield from reversed(chunk)

    def at_or_after(self, bound: tuple[Any, ...]) -> Iterator[K]:
        """Items greater than or equal to ``bound``, the least first."""
        i = bisect_left(self._maxes, bound)
        if i < len(self._chunks):
            chunk = self._chunks[i]
            yield from chunk[bisect_left(chunk, bound) :]
        for chunk in self._chunks[i + 1 :]:
            yield from chunk


def _ready_key(s: StoredTask) -> tuple[int, int, int, str]:
    return (-s.prio, s.est_ms, s.record.seq, s.task_id)


def _age_key(s: StoredTask) -> tuple[float, int, str]:
    return (s.record.ready_at or 0.0, s.record.seq, s.task_id)


class TaskMirror:
    """The bucket's tasks, idempotency keys and learned run times, indexed (module docstring)."""

    def __init__(self) -> None:
        self.tasks: dict[str, StoredTask] = {}
        self.revisions: dict[str, int] = {}
        #: Revision of each delete this queue wrote that the watcher has not delivered yet.
        self.deleted: dict[str, int] = {}
        self.keys: dict[str, tuple[KeyOwner, int]] = {}
        self.durations: dict[str, tuple[Duration, int]] = {}
        #: Keys whose latest entry is a delete marker: ``(its revision, when it was seen)``.
        self.markers: dict[str, tuple[int, float]] = {}
        self.ready = {False: SortedKeys[tuple[int, int, int, str]](), True: SortedKeys()}
        self.age = {False: SortedKeys[tuple[float, int, str]](), True: SortedKeys()}
        self.by_seq = SortedKeys[tuple[int, str]]()
        self.by_state = {state: SortedKeys[tuple[int, str]]() for state in TaskState}
        self.submitted = SortedKeys[tuple[float, int]]()
        self.owner_open: dict[tuple[str, bool], SortedKeys[tuple[int, str]]] = {}
        self.by_worker: dict[str, set[str]] = {}
        self.count = Counter[tuple[bool, TaskState]]()
        #: The highest revision applied (from the watcher or a write).
        self.revision = 0

    # -- writes --------------------------------------------------------------------------------

    def _newer(self, task_id: str, revision: int) -> bool:
        held = max(self.revisions.get(task_id, 0), self.deleted.get(task_id, 0))
        return revision > held

    def put_task(self, stored: StoredTask, revision: int) -> bool:
        """Hold ``stored`` at ``revision``; False (nothing changes) when an equal or later
        revision of the task is held already."""
        task_id = stored.task_id
        if not self._newer(task_id, revision):
            return False
        old = self.tasks.get(task_id)
        if old is not None:
            self._unindex(old)
        self.deleted.pop(task_id, None)
        self.tasks[task_id] = stored
        self.revisions[task_id] = revision
        self._index(stored)
        self.revision = max(self.revision, revision)
        return True

    def delete_task(self, task_id: str, revision: int) -> bool:
        """The task's key was deleted at ``revision``."""
        if not self._newer(task_id, revision):
            return False
        old = self.tasks.pop(task_id, None)
        if old is not None:
            self._unindex(old)
        self.revisions.pop(task_id, None)
        self.deleted[task_id] = revision
        self.revision = max(self.revision, revision)
        return True

    def forget_delete(self, task_id: str, revision: int) -> None:
        """Drop the task's delete mark once the watcher delivered a delete at ``revision`` or
        later: every older write of the key was delivered before it."""
        if self.deleted.get(task_id, revision + 1) <= revision:
            del self.deleted[task_id]

    def put_key(self, name: str, owner: KeyOwner | None, revision: int) -> None:
        held = self.keys.get(name)
        if held is not None and held[1] >= revision:
            return
        if owner is None:
            self.keys.pop(name, None)
        else:
            self.keys[name] = (owner, revision)
        self.revision = max(self.revision, revision)

    def put_duration(self, name: str, duration: Duration | None, revision: int) -> None:
        held = self.durations.get(name)
        if held is not None and held[1] >= revision:
            return
        if duration is None:
            self.durations.pop(name, None)
        else:
            self.durations[name] = (duration, revision)
        self.revision = max(self.revision, revision)

    def _index(self, s: StoredTask) -> None:
        self._each_index(s, add=True)

    def _unindex(self, s: StoredTask) -> None:
        self._each_index(s, add=False)

    def _each_index(self, s: StoredTask, *, add: bool) -> None:
        r, lane, state = s.record, s.maintenance, s.state
        pairs: list[tuple[SortedKeys[Any], tuple[Any, ...]]] = [
            (self.by_seq, (r.seq, r.task_id)),
            (self.by_state[state], (r.seq, r.task_id)),
            (self.submitted, (r.submitted_at, r.seq)),
        ]
        if state in READY_STATES:
            pairs += [(self.ready[lane], _ready_key(s)), (self.age[lane], _age_key(s))]
        if not state.terminal:
            index = self.owner_open.setdefault((r.owner, lane), SortedKeys())
            pairs.append((index, (r.seq, r.task_id)))
        for index, item in pairs:
            if add:
                index.add(item)
            else:
                index.discard(item)
        self.count[(lane, state)] += 1 if add else -1
        if self.count[(lane, state)] == 0:
            del self.count[(lane, state)]
        if state in LEASED_STATES and s.worker is not None:
            self._worker(s.worker, r.task_id, add)

    def _worker(self, worker: str, task_id: str, add: bool) -> None:
        held = self.by_worker.setdefault(worker, set())
        if add:
            held.add(task_id)
        else:
            held.discard(task_id)
            if not held:
                del self.by_worker[worker]

    # -- reads ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> StoredTask | None:
        return self.tasks.get(task_id)

    def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` ids that start with ``prefix`` (a scan of the ids in memory)."""
        return sorted(islice((t for t in self.tasks if t.startswith(prefix)), limit))

    def records(self, ids: Iterator[str], limit: int) -> list[TaskRecord]:
        found: list[TaskRecord] = []
        for task_id in ids:
            if len(found) >= limit:
                break
            found.append(self.tasks[task_id].record)
        return found

    def ready_page(self, maintenance: bool, limit: int, offset: int = 0) -> list[TaskRecord]:
        """Ready tasks of one lane in dispatch order, from ``offset``."""
        items = self.ready[maintenance].from_index(max(0, offset))
        return self.records((item[3] for item in items), limit)

    def overdue(self, maintenance: bool, ready_before: float, limit: int) -> list[TaskRecord]:
        """Ready tasks of one lane ready at ``ready_before`` or earlier, longest waiting first."""
        ids: list[str] = []
        for ready_at, _, task_id in self.age[maintenance]:
            if ready_at > ready_before or len(ids) >= limit:
                break
            ids.append(task_id)
        return [self.tasks[t].record for t in ids]

    def open_tasks(self, owner: str, limit: int) -> list[TaskRecord]:
        """``owner``'s tasks not ended: the user lane, then maintenance, each by ``seq``."""
        lanes = (self.owner_open.get((owner, lane)) for lane in (False, True))
        ids = (task_id for lane in lanes if lane is not None for _, task_id in lane)
        return self.records(ids, limit)

    def open_maintenance(self, owner: str) -> int:
        return len(self.owner_open.get((owner, True), ()))

    def in_state(self, *states: TaskState) -> list[StoredTask]:
        return [self.tasks[t] for state in states for _, t in self.by_state[state]]

    def held_by(self, worker: str) -> list[StoredTask]:
        return [self.tasks[t] for t in self.by_worker.get(worker, ())]

    def first_seq_since(self, since: float) -> int | None:
        """``seq`` of the first task submitted at ``since`` or later (by submission time)."""
        found = next(self.submitted.at_or_after((since,)), None)
        return None if found is None else found[1]

    def history(
        self, state: TaskState | None, since: float | None, cursor: str | None, limit: int
    ) -> HistoryPage:
        """Newest first, keyset-paged on ``seq`` (the embedded queue's pages)."""
        index = self.by_seq if state is None else self.by_state[state]
        bound = int(cursor) if cursor is not None else None
        first = 0
        if since is not None:
            found = self.first_seq_since(since)
            if found is None:
                return HistoryPage([], None)
            first = found
        items = index.below((bound,)) if bound is not None else reversed(index)
        records: list[TaskRecord] = []
        more = False
        for seq, task_id in items:
            if seq < first:
                break
            record = self.tasks[task_id].record
            if since is not None and record.submitted_at < since:
                continue
            if len(records) == limit:
                more = True
                break
            records.append(record)
        return HistoryPage(records, str(records[-1].seq) if more and records else None)

    def purgeable(self, ended_before: float, limit: int) -> list[StoredTask]:
        """Up to ``limit`` tasks that ended before ``ended_before``, by ``seq``; never the
        newest task (``seq`` bound: submitted before the cut-off, as the embedded queue)."""
        newest = self.by_seq.last()
        if newest is None:
            return []
        bound = newest[0]
        first_recent = self.first_seq_since(ended_before)
        if first_recent is not None:
            bound = min(bound, first_recent)
        found: list[StoredTask] = []
        ended = heapq.merge(*(iter(self.by_state[s]) for s in ENDED_STATES))
        for seq, task_id in ended:
            if seq >= bound or len(found) >= limit:
                break
            stored = self.tasks[task_id]
            finished = stored.record.finished_at
            if finished is not None and finished < ended_before:
                found.append(stored)
        return found

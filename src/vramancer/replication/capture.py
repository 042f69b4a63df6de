"""What a primary journals: the current state of every thing an acknowledged request changed.

Capture listens to the event bus (``task_state``, the ``block_*`` kinds, ``mode_changed``,
``profile_switch_failed``, ``allocation_granted``/``allocation_released``) and to the task
service's retention purge, and marks the thing each names as *dirty*. A flush reads the current
state of every dirty thing (a task's full SQLite row, a block's catalog entry and, with ``[ha]
replicate_data``, the bytes of a block on L5/L6, the profile in force, an allocation made by
hand) and appends one delta each to the journal: a thing that is gone becomes its ``*_delete``
kind. Since a delta is a state and not an operation, marks that pile up coalesce, and a standby
that applies them in order ends where the primary is.

``barrier()`` is what sync mode waits on: it returns once everything marked before the call is
in the journal, with the journal's last seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vramancer import event_types as ev
from vramancer.errors import NotFound
from vramancer.events import Event, EventBus
from vramancer.memory.store import TieredStore
from vramancer.models.manager import ModelManager
from vramancer.replication.kinds import DeltaKind, pack
from vramancer.tasks import sqlite_replica
from vramancer.tasks.queue import Purged
from vramancer.tasks.service import TaskService
from vramancer.tasks.sqlite_queue import SqliteQueue

log = logging.getLogger(__name__)

#: Tiers whose blocks' bytes may be replicated (``[ha] replicate_data``); RAM tiers never are.
DATA_TIERS = frozenset({"L5", "L6"})
#: A block's bytes are shipped up to this size (one delta); bigger ones travel as entry only.
MAX_DATA_BYTES = 48 * 1024 * 1024
#: Owner prefixes of allocations the daemon makes itself (models, tasks): not replicated.
MANAGED_OWNERS = ("model:", "task:")
#: Delta payloads: (kind, payload bytes).
Append = Callable[[Sequence[tuple[str, bytes]]], int]

_TASK, _BLOCK, _PROFILE, _ALLOC = "task", "block", "profile", "alloc"
_BLOCK_KINDS = frozenset(
    {
        ev.BlockPut.kind,
        ev.BlockDeleted.kind,
        ev.BlockPromoted.kind,
        ev.BlockDemoted.kind,
        ev.BlockEvicted.kind,
        ev.BlockLost.kind,
        ev.BlockPinned.kind,
        ev.BlockUnpinned.kind,
    }
)
_PROFILE_KINDS = frozenset({ev.ModeChanged.kind, ev.ProfileSwitchFailed.kind})


def block_entry(info: dict[str, Any]) -> dict[str, Any]:
    """A block's catalog entry as shipped: its description less the time-dependent hotness."""
    return {k: v for k, v in info.items() if k != "hotness"}


def profile_state(models: ModelManager) -> dict[str, Any]:
    last = models.last_switch
    return {"name": models.profile, "last_switch": last.as_dict() if last is not None else None}


class Capture:
    """Marks from the event bus, flushed into the journal; see the module docstring."""

    def __init__(
        self,
        *,
        events: EventBus,
        tasks: TaskService,
        memory: TieredStore,
        models: ModelManager,
        append: Append,
        replicate_data: bool,
    ) -> None:
        self.events = events
        self.tasks = tasks
        self.memory = memory
        self.models = models
        self._append = append
        self.replicate_data = replicate_data
        self._dirty: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._lock = threading.Lock()
        self._marked = 0
        self._flushed = 0
        self._done = asyncio.Condition()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        #: Last seq appended by a flush.
        self.last_seq = 0
        self.enabled = True

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Listen (before the subsystems start, so their first changes are seen)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._unsubscribe = self.events.subscribe(self._on_event)
        self.tasks.telemetry.purge_listeners.append(self._purged)
        self._runner = asyncio.create_task(self._run(), name="ha-capture")

    def _purged(self, tasks: Sequence[Purged]) -> None:
        for task in tasks:
            self.mark(_TASK, task.task_id)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        listeners = self.tasks.telemetry.purge_listeners
        if self._purged in listeners:
            listeners.remove(self._purged)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    # ------------------------------------------------------------------ marks

    def mark(self, what: str, key: str, extra: dict[str, Any] | None = None) -> None:
        """``what`` (task, block, profile, alloc) ``key`` changed; may be called from any
        thread."""
        if not self.enabled:
            return
        with self._lock:
            self._dirty.pop((what, key), None)
            self._dirty[(what, key)] = extra
            self._marked += 1
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def pending(self) -> list[list[Any]]:
        """What is marked and not yet journaled: ``[what, key, extra]`` each (kept across a
        clean stop, marked again at the next start)."""
        with self._lock:
            return [[what, key, extra] for (what, key), extra in self._dirty.items()]

    async def resync(self, *, everything: bool, pending: list[list[Any]]) -> int:
        """Mark again what a previous run left unjournaled: ``pending`` after a clean stop;
        ``everything`` (every task, block, the profile) after a crash, or when replication
        was just turned on over existing state. Returns the marks made."""
        for what, key, extra in pending:
            self.mark(str(what), str(key), extra)
        if not everything:
            return len(pending)
        queue = self.tasks.queue
        task_ids = await sqlite_replica.all_ids(queue) if isinstance(queue, SqliteQueue) else []
        for task_id in task_ids:
            self.mark(_TASK, task_id)
        block_ids = await asyncio.to_thread(self._block_ids)
        for block_id in block_ids:
            self.mark(_BLOCK, block_id)
        self.mark(_PROFILE, "")
        return len(pending) + len(task_ids) + len(block_ids) + 1

    def _block_ids(self) -> list[str]:
        ids: list[str] = []
        while True:
            page, total = self.memory.list_blocks(limit=1000, offset=len(ids))
            ids += [str(b["id"]) for b in page]
            if not page or len(ids) >= total:
                return ids

    def _on_event(self, event: Event) -> None:
        payload = event.payload
        kind = event.kind
        if isinstance(payload, ev.TaskStateChanged):
            self.mark(_TASK, payload.task_id)
        elif kind in _BLOCK_KINDS:
            self.mark(_BLOCK, str(event.data["id"]))
        elif kind in _PROFILE_KINDS:
            self.mark(_PROFILE, "")
        elif isinstance(payload, ev.AllocationGranted | ev.AllocationReleased):
            owner = payload.owner or ""
            if not owner.startswith(MANAGED_OWNERS):
                granted = isinstance(payload, ev.AllocationGranted)
                self.mark(_ALLOC, payload.id, payload.as_data() if granted else None)

    # ------------------------------------------------------------------ flushing

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("HA capture: journaling changes failed (retrying)")
                await asyncio.sleep(0.5)
                self._wake.set()

    async def flush(self) -> int:
        """Journal the current state of everything marked so far; returns the deltas written."""
        with self._lock:
            batch = list(self._dirty.items())
            self._dirty.clear()
            generation = self._marked
        try:
            deltas = await self._deltas(batch)
            if deltas:
                self.last_seq = await asyncio.to_thread(self._append, deltas)
        except BaseException:
            with self._lock:  # put them back for the next try, before newer marks
                self._dirty = {**dict(batch), **self._dirty}
            raise
        async with self._done:
            self._flushed = max(self._flushed, generation)
            self._done.notify_all()
        return len(deltas)

    async def barrier(self) -> int:
        """Wait until every mark made before this call is journaled; the last seq then."""
        with self._lock:
            wanted = self._marked
        if self._wake is not None:
            self._wake.set()
        async with self._done:
            await self._done.wait_for(lambda: self._flushed >= wanted)
        return self.last_seq

    async def _deltas(
        self, batch: list[tuple[tuple[str, str], dict[str, Any] | None]]
    ) -> list[tuple[str, bytes]]:
        task_ids = [key for (what, key), _ in batch if what == _TASK]
        rows = await self._task_rows(task_ids)
        out: list[tuple[str, bytes]] = []
        for (what, key), extra in batch:
            if what == _TASK:
                row = rows.get(key)
                out.append(
                    (DeltaKind.TASK, pack({"row": row}))
                    if row is not None
                    else (DeltaKind.TASK_DELETE, pack({"id": key}))
                )
            elif what == _BLOCK:
                out.append(await asyncio.to_thread(self.block_delta, key))
            elif what == _PROFILE:
                out.append((DeltaKind.PROFILE, pack(profile_state(self.models))))
            elif extra is not None:
                out.append((DeltaKind.ALLOCATION, pack({"allocation": extra})))
            else:
                out.append((DeltaKind.ALLOCATION_DELETE, pack({"id": key})))
        return out

    async def _task_rows(self, task_ids: list[str]) -> dict[str, dict[str, Any]]:
        queue = self.tasks.queue
        if not task_ids or not isinstance(queue, SqliteQueue):
            return {}
        return await sqlite_replica.read_rows(queue, task_ids)

    def block_delta(self, block_id: str) -> tuple[str, bytes]:
        """The delta of one block now: its entry (and bytes, see ``replicate_data``), or its
        deletion."""
        try:
            info = self.memory.info(block_id)
            data: bytes | None = None
            if (
                self.replicate_data
                and info.get("tier") in DATA_TIERS
                and int(info.get("size", 0)) <= MAX_DATA_BYTES
            ):
                data, info = self.memory.peek_bytes(block_id)
        except NotFound:
            return DeltaKind.BLOCK_DELETE, pack({"id": block_id})
        return DeltaKind.BLOCK, pack({"block": block_entry(info)}, data)

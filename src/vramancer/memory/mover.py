"""The tiered store's mover: it copies blocks between tiers and applies the planner's moves.

Every method runs with the store's mover mutex held (``TieredStore._mover``), which serialises
everything that moves data; the metadata lock (``StoreState.lock``) is taken only for
bookkeeping, never across I/O. A plan (``memory/planner.py``) is applied move by move, each
rechecked under the metadata lock just before its copy: a move whose block is gone, has moved,
changed (replaced, pinned) or whose target no longer has room is **skipped**, never replanned
here. The caller then checks the outcome it needed on the live state (the room for a put, the
tier of a promoted block) and tries its next option, as it would without the skipped move.

Batches. Consecutive moves of a plan into the same file tier (L5, L6) are applied as one batch
(:meth:`Mover.relocate_batch`): each block file is written with its writeback started; once the
last is written, each is fdatasynced (an L6 file before its rename, as always), the directory
is fsynced once, and only then are the catalog rows committed, in one transaction; then each
block switches to its new copy. The rule a single move keeps holds for every block of a batch:
a row is committed only once its file's data and name are durable, so a crash at any point
loses no block that was on disk (a restart adopts the complete files from their records), and
a batch that fails before its commit unlinks only the files it wrote itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from vramancer.clock import Clock
from vramancer.errors import InsufficientStorage
from vramancer.events import EventBus
from vramancer.memory.backends import FileBackend, FileHandle, Layout
from vramancer.memory.catalog import BlockRow, Catalog
from vramancer.memory.compression import CorruptBlock
from vramancer.memory.hotness import HotnessModel
from vramancer.memory.metrics import Moved, StoreMetrics
from vramancer.memory.planner import Move
from vramancer.memory.state import Entry, Free, StoreState, Tier
from vramancer.observability import tracing

log = logging.getLogger("vramancer.memory.store")


#: Most moves written in one batch before their directory fsync and their commit.
MAX_BATCH = 32


@dataclass(slots=True)
class _Written:
    """A move of a batch whose new copy is written, not yet switched to."""

    entry: Entry
    source: Tier
    handle: Any
    new_handle: Any
    reason: str
    seconds: float


#: The event of a move, by the kind ``MemoryMetrics.observe`` names.
class Mover:
    """Copies blocks between tiers (see the module docstring for the rules it keeps)."""

    def __init__(
        self,
        state: StoreState,
        *,
        db: Callable[[], Catalog],
        hotness: Callable[[], HotnessModel],
        costs: Any,
        clock: Clock,
        metrics: StoreMetrics,
        events: EventBus,
    ) -> None:
        self._state = state
        self._db = db
        self._hotness = hotness
        #: The policy's learned reload costs (``observe(tier, size, seconds)``), if it has any.
        self._costs = costs if costs is not None and hasattr(costs, "observe") else None
        self._clock = clock
        self._metrics = metrics
        self._events = events
        #: Rows of deleted blocks that a full disk kept the catalog from removing (retried).
        self.stale_rows: set[str] = set()
        self._reap_queue: queue.Queue[Free | None] = queue.Queue()
        self._reaper: threading.Thread | None = None

    # -- plans -------------------------------------------------------------------------------

    def apply(
        self,
        moves: Sequence[Move],
        *,
        allow_pinned: bool = False,
        tolerate: tuple[type[BaseException], ...] = (),
    ) -> int:
        """Apply ``moves`` in order, each rechecked (skipped when it no longer holds); a
        corrupt block stays where it is. Returns how many moved."""
        moved = 0
        for run in self._runs(moves):
            if len(run) > 1:
                moved += self.relocate_batch(run, allow_pinned=allow_pinned, tolerate=tolerate)
                continue
            move = run[0]
            entry = self._current(move)
            if entry is None:
                continue
            try:
                if self.relocate(
                    entry, self._state.by_name[move.target], move.reason, allow_pinned=allow_pinned
                ):
                    moved += 1
            except CorruptBlock:
                log.exception("block %r is corrupted; it stays in %s", move.block_id, move.source)
            except tolerate:
                log.exception("could not move block %r (%s)", move.block_id, move.reason)
        return moved

    def _runs(self, moves: Sequence[Move]) -> Iterator[list[Move]]:
        """``moves`` in order, consecutive moves into the same file tier together (up to
        ``MAX_BATCH``), every other move alone."""
        by_name = self._state.by_name
        run: list[Move] = []
        for move in moves:
            target = by_name.get(move.target)
            batched = target is not None and isinstance(target.backend, FileBackend)
            if run and (not batched or run[0].target != move.target or len(run) >= MAX_BATCH):
                yield run
                run = []
            if batched:
                run.append(move)
            else:
                yield [move]
        if run:
            yield run

    def _current(self, move: Move) -> Entry | None:
        """The block ``move`` moves, if it is still where and what the plan saw."""
        entry = self._state.blocks.get(move.block_id)
        if entry is None or entry.meta.tier != move.source or entry.meta.size != move.size:
            return None
        return entry

    # -- a batch of moves into one file tier -------------------------------------------------

    def relocate_batch(
        self,
        moves: Sequence[Move],
        *,
        allow_pinned: bool = False,
        tolerate: tuple[type[BaseException], ...] = (),
    ) -> int:
        """Apply ``moves``, all into the same file tier, as one batch (see the module
        docstring): every file written, then fsynced, one directory fsync, one commit of the
        rows, then the switches. Each move is rechecked as :meth:`apply` does; a corrupt block
        stays where it is, an error in ``tolerate`` skips its move (or, in the commit, the
        batch). Another error stops the writing: the moves written before it are committed,
        then it is raised. Returns how many moved."""
        if not moves:
            return 0
        target = self._state.by_name[moves[0].target]
        if any(move.target != target.name for move in moves):
            raise ValueError("a batch moves blocks into one tier")
        written: list[_Written] = []
        failure: BaseException | None = None
        reserved = 0
        for move in moves:
            try:
                done = self._write_one(move, target, reserved, allow_pinned)
            except CorruptBlock:
                log.exception("block %r is corrupted; it stays in %s", move.block_id, move.source)
                continue
            except tolerate:
                log.exception("could not move block %r (%s)", move.block_id, move.reason)
                continue
            except BaseException as exc:
                failure = exc
                break
            if done is not None:
                written.append(done)
                reserved += done.entry.meta.size
        try:
            self._commit(target, written)
        except tolerate:
            log.exception("could not move %d blocks into %s", len(written), target.name)
            return 0
        if failure is not None:
            raise failure
        return len(written)

    def _write_one(
        self, move: Move, target: Tier, reserved: int, allow_pinned: bool
    ) -> _Written | None:
        """Write the new copy of ``move``'s block into ``target`` (``reserved`` bytes of its
        room are taken by the batch already); None when the move no longer holds."""
        entry = self._current(move)
        claimed = None if entry is None else self._claim(entry, target, reserved, allow_pinned)
        if entry is None or claimed is None:
            return None
        source, handle = claimed
        upward = target.spec.latency < source.spec.latency
        name = "memory.promote" if upward else "memory.demote"
        start = time.perf_counter()
        try:
            with tracing.span(name, block_id=move.block_id, source=source.name, target=target.name):
                new_handle = self._write(entry, source, target, handle, None, False, deferred=True)
        except BaseException:
            self.release(entry)
            raise
        seconds = time.perf_counter() - start
        return _Written(entry, source, handle, new_handle, move.reason, seconds)

    def _commit(self, target: Tier, written: list[_Written]) -> None:
        """Make the ``written`` files durable (each fdatasynced, then one directory fsync),
        commit their rows (one transaction), then switch each block to its new copy. On a
        failure before the commit the written files are unlinked and the blocks stay where
        they were."""
        if not written:
            return
        backend = target.backend
        assert isinstance(backend, FileBackend)
        start = time.perf_counter()
        now = self._clock.monotonic()
        try:
            backend.sync_batch([w.new_handle for w in written])
            rows = [self.row(w.entry, now, target, w.new_handle) for w in written]
            # As for one move: rows of blocks from volatile memory need no fsync of their own.
            self._db().upsert_many(rows, durable=any(w.source.is_disk for w in written))
        except BaseException:
            self.free([(target, w.new_handle) for w in written], now=True)
            for w in written:
                self.release(w.entry)
            raise
        shared = (time.perf_counter() - start) / len(written)
        for w in written:
            self._switch(
                w.entry, w.source, target, w.handle, w.new_handle, w.reason, w.seconds + shared
            )

    # -- one move ----------------------------------------------------------------------------

    def relocate(
        self,
        entry: Entry,
        target: Tier,
        reason: str,
        *,
        value: Any = None,
        owned: bool = False,
        allow_pinned: bool = False,
        read_s: float = 0.0,
        prefetched: bool = False,
    ) -> bool:
        """Move ``entry`` to ``target``. Copies outside the metadata lock; the old copy is
        freed after the switch, or when its last reader is done. Returns False (nothing done)
        if the block changed meanwhile (deleted, replaced, pinned, already there) or the
        target has no room for it.

        ``value``: the block's data when the caller already read it (``read_s`` seconds, counted
        in the move's time). ``prefetched``: a promotion ahead of the reader (the target's
        index keeps it apart until its read comes)."""
        claimed = self._claim(entry, target, 0, allow_pinned)
        if claimed is None:
            return False
        source, handle = claimed
        upward = target.spec.latency < source.spec.latency
        start = time.perf_counter()
        try:
            new_handle = self._copy(entry, source, target, handle, value, owned, upward)
        except BaseException:
            self.release(entry)
            raise
        seconds = time.perf_counter() - start + read_s
        self._switch(entry, source, target, handle, new_handle, reason, seconds, prefetched)
        return True

    def _claim(
        self, entry: Entry, target: Tier, reserved: int, allow_pinned: bool
    ) -> tuple[Tier, Any] | None:
        """Under the metadata lock: whether ``entry`` may move into ``target`` now (still the
        block's, not pinned, not there, room beyond ``reserved`` bytes); if so it is marked
        read (its copy stays until :meth:`release` or the switch) and (source tier, handle)
        are returned."""
        state = self._state
        meta = entry.meta
        with state.lock:
            if (
                state.blocks.get(meta.id) is not entry
                or (meta.pinned and not allow_pinned)
                or meta.tier == target.name
                or target.free - reserved < meta.size
            ):
                return None
            meta.readers += 1
            return state.by_name[meta.tier], entry.handle

    def _switch(
        self,
        entry: Entry,
        source: Tier,
        target: Tier,
        handle: Any,
        new_handle: Any,
        reason: str,
        seconds: float,
        prefetched: bool = False,
    ) -> None:
        """The block now lives in ``target`` at ``new_handle``; its old copy is retired."""
        state = self._state
        meta = entry.meta
        upward = target.spec.latency < source.spec.latency
        now = self._clock.monotonic()
        with state.lock:
            meta.readers -= 1
            state.account_out(source, entry)
            entry.handle = new_handle
            state.account_in(target, entry, now, prefetched=prefetched)
            frees = state.retire(entry, source, handle)
            self._metrics.count(meta.size, upward, reason)
        self.free(frees)
        self._report(Moved(meta.id, meta.size, source.name, target.name, reason, seconds, upward))

    def _copy(
        self,
        entry: Entry,
        source: Tier,
        target: Tier,
        handle: Any,
        value: Any,
        owned: bool,
        upward: bool,
    ) -> Any:
        """Read (unless ``value``), write into ``target`` and update the catalog; returns the
        new handle (freed again if the catalog fails)."""
        meta = entry.meta
        name = "memory.promote" if upward else "memory.demote"
        with tracing.span(name, block_id=meta.id, source=source.name, target=target.name):
            new_handle = self._write(entry, source, target, handle, value, owned)
            try:
                if target.is_disk:
                    # From volatile memory, a crash loses the block anyway: no fsync of
                    # the row. Between L5 and L6 the old file goes away: durable.
                    row = self.row(entry, self._clock.monotonic(), target, new_handle)
                    self._db().upsert(row, durable=source.is_disk)
                elif source.is_disk:
                    self._db().delete(meta.id, durable=False)
            except BaseException:
                target.backend.free(new_handle)
                raise
        return new_handle

    def _write(
        self,
        entry: Entry,
        source: Tier,
        target: Tier,
        handle: Any,
        value: Any,
        owned: bool,
        *,
        deferred: bool = False,
    ) -> Any:
        """Read (unless ``value``) and write the block's new copy into ``target``; returns its
        handle. ``deferred``: a file is made durable later, with its batch."""
        meta = entry.meta
        layout = self._state.layout(entry)
        if value is None:
            value = source.backend.read(handle, layout, meta.id)
            owned = source.is_disk
        durable = meta.id in self._state.durable
        return target.backend.write(
            meta.id,
            layout,
            value,
            owned=owned,
            hint=meta.hint,
            record=self.record(entry, layout, durable) if target.is_disk else None,
            deferred=deferred,
        )

    def _report(self, move: Moved) -> None:
        """Metrics and one event per move, after the lock is released."""
        event = self._metrics.observe(move)
        by_name = self._state.by_name
        for name in (move.source, move.target):
            self._metrics.publish(by_name[name])
        # A move up is a reload from its source tier: what the eviction ranking of the tier
        # above that one counts as the cost of evicting a block (moves down measure writes).
        if move.upward and self._costs is not None:
            with self._state.lock:
                self._costs.observe(move.source, move.size, move.seconds)
        self._events.publish(
            event(
                id=move.block_id,
                size=move.size,
                source=move.source,
                target=move.target,
                reason=move.reason,
                seconds=round(move.seconds, 6),
            )
        )

    # -- records of blocks on disk -----------------------------------------------------------

    def record(self, entry: Entry, layout: Layout, durable: bool) -> dict[str, Any]:
        """What a block file says about its block (``blockfile.py``), to rebuild its row."""
        meta = entry.meta
        return {
            "id": meta.id,
            "size": meta.size,
            "kind": layout.kind.value,
            "dtype": layout.dtype,
            "shape": list(layout.shape),
            "itemsize": layout.itemsize,
            "priority": meta.priority,
            "hint": meta.hint,
            "written": time.time_ns(),
            "created": self._clock.time(),
            "durable": durable,
        }

    def row(
        self,
        entry: Entry,
        now: float,
        tier: Tier | None = None,
        handle: Any = None,
        *,
        durable: bool | None = None,
    ) -> BlockRow:
        """The catalog row of a block on disk (in ``tier`` at ``handle`` if given)."""
        meta, layout = entry.meta, self._state.layout(entry)
        handle = entry.handle if handle is None else handle
        assert isinstance(handle, FileHandle)
        return BlockRow(
            id=meta.id,
            size=meta.size,
            tier=tier.name if tier is not None else meta.tier,
            priority=meta.priority,
            pinned=meta.pinned,
            hint=meta.hint,
            kind=layout.kind.value,
            dtype=layout.dtype,
            shape=layout.shape,
            itemsize=layout.itemsize,
            file=handle.path.name,
            codec=handle.codec,
            stored_size=handle.stored_size,
            hits=self._hotness().score(meta, now),
            created=self._clock.time(),
            durable=meta.id in self._state.durable if durable is None else durable,
        )

    def forget_row(self, block_id: str) -> None:
        """Remove a deleted block's row. A full disk only postpones it (the row names a file
        that is gone, which a restart drops too): the delete still succeeds."""
        try:
            self._db().delete(block_id)
        except InsufficientStorage:
            log.warning("disk full: the catalog row of deleted block %r is removed later", block_id)
            self.stale_rows.add(block_id)
        else:
            self.stale_rows.discard(block_id)

    def retry_stale_rows(self) -> None:
        """Remove the rows :meth:`forget_row` had to postpone (those of blocks put again since
        are current: they stay)."""
        blocks, by_name = self._state.blocks, self._state.by_name
        for block_id in list(self.stale_rows):
            entry = blocks.get(block_id)
            if entry is not None and by_name[entry.meta.tier].is_disk:
                self.stale_rows.discard(block_id)
                continue
            self.forget_row(block_id)

    # -- readers and old copies --------------------------------------------------------------

    def release(self, entry: Entry) -> None:
        """A reader is done; the last one frees what was retired meanwhile."""
        with self._state.lock:
            frees = self._state.release(entry)
        self.free(frees)

    def free(self, frees: list[Free], *, now: bool = False) -> None:
        """Free retired copies. Files are unlinked by a background thread (unless ``now``):
        unlinking a large file takes milliseconds the mover need not wait for; names are
        unique per stored version, so a late unlink never hits a newer copy."""
        for tier, handle in frees:
            if tier.is_disk and not now:
                self._reap(tier, handle)
                continue
            try:
                tier.backend.free(handle)
            except OSError:
                log.exception("could not free an old copy in %s", tier.name)

    def _reap(self, tier: Tier, handle: Any) -> None:
        with self._state.lock:
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reaper_loop, name="vramancer-memory-reaper", daemon=True
                )
                self._reaper.start()
        self._reap_queue.put((tier, handle))

    def _reaper_loop(self) -> None:
        while True:
            item = self._reap_queue.get()
            try:
                if item is None:
                    return
                tier, handle = item
                tier.backend.free(handle)
            except OSError:
                log.exception("could not free an old copy")
            finally:
                self._reap_queue.task_done()

    def flush(self) -> None:
        """Wait until every retired copy has been freed (files unlinked)."""
        if self._reaper is not None:
            self._reap_queue.join()

    def stop(self) -> None:
        """Stop the reaper thread once it has freed what it was given."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            self._reap_queue.put(None)
            reaper.join()

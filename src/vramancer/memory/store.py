"""The tiered block store: real data in every tier, moved by hotness, never lost.

``TieredStore`` is the executor of the pure policies wired in ``memory/policy.py`` (hotness,
placement, eviction order, promotion, prefetch): it holds the data in tier backends
(``memory/backends.py``), keeps the accounting, moves blocks, persists the metadata of blocks
on disk (``memory/catalog.py``) and reports every move (events, metrics, spans). This module
is the public surface, the hit path and the locks; a put is written by ``memory/writes.py``,
deferred promotions wait in ``memory/promotions.py``, the background loop is
``memory/maintenance.py``.

Concurrency. One lock (``_lock``) guards every piece of metadata: the block table, each tier's
accounting and eviction index, the policies (which are not thread-safe). It is held only for
metadata work, never for I/O, so ``get`` of a resident block never waits for a disk. Work that
moves data (put, delete, promote, demote, evict, pin, capacity changes) is serialised by a
second, re-entrant mutex (``_mover``) taken *before* ``_lock``: while one mover copies a block
outside ``_lock``, no other mover can take the room it checked, so a tier's accounted bytes
never pass its capacity. A reader marks the block (``BlockMeta.readers``) while it copies the
data out; a move or delete that retires the block's old copy meanwhile defers freeing it until
the last reader is done. ``get`` only *tries* the mover (non-blocking) to promote what it just
read; when busy, the promotion is queued for the maintenance loop.

Durability. L5/L6 blocks have a row in ``<data_dir>/memory.sqlite`` written after their file
is complete, so a restart finds every block that was on disk; each block file also carries a
record of its block, so the catalog is rebuilt from the files when rows are missing
(``memory/recovery.py``). L1–L4 are volatile: a graceful ``stop()`` spills them to L5/L6 where
there is room (``memory.spill_on_stop``); a crash loses them. A block promoted out of L5/L6 is
volatile from then on. A durable put (``put(..., durable=True)``, ``memory.durable_puts``)
places the block in L5/L6 only and returns once its file, its directory and its row are
fsynced. A full disk raises ``InsufficientStorage`` and changes nothing; a delete removes the
file first, so it works on a full disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vramancer import event_types as ev
from vramancer.clock import Clock
from vramancer.devices.manager import DeviceManager
from vramancer.errors import (
    Conflict,
    InsufficientMemory,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    ShuttingDown,
)
from vramancer.events import EventBus
from vramancer.memory.backends import DataKind, FileHandle, describe, raw_view
from vramancer.memory.catalog import Catalog
from vramancer.memory.catalog import check as check_catalog
from vramancer.memory.checks import (
    MAX_LIST_OFFSET,
    MAX_PRIORITY,
    BlockTooLarge,
    PutReceipt,
    check_block_id,
    check_capacity,
    check_hint,
    check_page,
    check_priority,
    check_size,
)
from vramancer.memory.compression import CompressionManager
from vramancer.memory.exports import BlockExport, from_bytes, from_file
from vramancer.memory.hotness import HotnessModel
from vramancer.memory.maintenance import MaintenanceLoop
from vramancer.memory.metrics import StoreMetrics
from vramancer.memory.mover import Mover
from vramancer.memory.opening import open_data_dir, open_tiers, report_recovery
from vramancer.memory.planning import Planning, tier_view
from vramancer.memory.plugins import load_compression, load_policy
from vramancer.memory.policy import StorePolicy
from vramancer.memory.promotions import PendingPromotions
from vramancer.memory.settings import MemorySettings
from vramancer.memory.state import Entry, StoreState, Tier, tier_stats
from vramancer.memory.storage import DataDirLock
from vramancer.memory.tiers import CudaDevice
from vramancer.memory.writes import Writer
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics
from vramancer.units import format_size

__all__ = [
    "MAX_LIST_OFFSET",
    "MAX_PRIORITY",
    "BlockTooLarge",
    "PutReceipt",
    "StorePolicy",
    "TieredStore",
    "check_block_id",
    "check_hint",
    "check_priority",
]

log = logging.getLogger(__name__)


#: A NumPy block (the hit path hands out a read-only view of it).
_NUMPY = DataKind.NUMPY


class TieredStore:
    """Blocks of data in tiers L1–L6; see the module docstring for the rules it keeps.

    Decisions are the planner's (``memory/planner.py``) over snapshots taken under the metadata
    lock; the mover (``memory/mover.py``) applies them, rechecking each move."""

    def __init__(
        self,
        settings: MemorySettings,
        *,
        data_dir: Path,
        devices: DeviceManager,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
        policy: StorePolicy | None = None,
        compression: CompressionManager | None = None,
        cuda: list[CudaDevice] | None = None,
    ) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir)
        self._devices = devices
        self._events = events
        self._clock = clock
        self._policy: StorePolicy = policy if policy is not None else load_policy(settings)
        #: The score decisions use: the policy's ``scorer`` (``memory.hotness_model``) if set.
        self._hotness: HotnessModel = getattr(self._policy, "scorer", None) or self._policy.hotness
        self._compression = compression or load_compression(settings)
        self._cuda = cuda
        self._state = state = StoreState()
        # The hit path reads these directly (one attribute lookup each).
        self._lock = state.lock
        self._blocks = state.blocks
        self._by_name = state.by_name
        self._mover = threading.RLock()
        self._top: Tier | None = None
        self._catalog: Catalog | None = None
        self._opened = False
        self._closed = False
        self._loop = MaintenanceLoop(self.maintain, settings.eviction_interval_s)
        self._misses = 0
        #: Fetches a block from the other nodes (given by the runtime: the fastpath); None: a
        #: block this node does not hold is ``NotFound``.
        self.remote: Callable[[str], bytes | bytearray] | None = None
        #: Keep a block fetched from a peer in this node's tiers.
        self.remote_keep = True
        self._dir_lock: DataDirLock | None = None
        self._metrics = StoreMetrics(metrics)
        self._moves = Mover(
            state,
            db=self._db,
            hotness=lambda: self._hotness,
            costs=getattr(self._policy, "costs", None),
            clock=clock,
            metrics=self._metrics,
            events=events,
        )
        self._plan = Planning(
            state,
            self._moves,
            placement=lambda: self._policy.placement,
            hotness=lambda: self._hotness,
            settings=settings,
            clock=clock,
        )
        self._pending = PendingPromotions(
            state,
            self._mover,
            self._plan,
            limit=settings.max_pending_promotions,
            top=lambda: self._top,
            closed=lambda: self._closed,
            after_growth=self._after_growth,
            wake=self._loop.wake,
        )
        self._writer = Writer(
            state,
            self._moves,
            self._plan,
            policy=self._policy,
            db=self._db,
            metrics=self._metrics,
            events=events,
            clock=clock,
            settings=settings,
            after_growth=self._after_growth,
        )
        # A damaged catalog is reported now, while the caller can still show a clean message
        # (``vramancer serve`` builds the runtime before it starts serving).
        check_catalog(self.data_dir / "memory.sqlite")
        DataDirLock.check_free(self.data_dir)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, maintenance: bool = True) -> None:
        """Resolve the tiers, recover the blocks on disk, start the maintenance loop
        (``maintenance=False``: not yet; an HA standby moves no block until promoted)."""
        await asyncio.to_thread(self.open)
        if maintenance:
            self._loop.start()

    def start_maintenance(self) -> None:
        """Start the maintenance loop of a store started without it (idempotent)."""
        if not self._loop.running:
            self._loop.start()

    async def stop_maintenance(self) -> None:
        """Stop the maintenance loop, keep the store open (an HA node turning standby)."""
        await self._loop.stop()

    async def stop(self) -> None:
        """Stop the loop, spill volatile blocks to disk where room (if configured), close."""
        await self._loop.stop()
        await asyncio.to_thread(self.close)

    def open(self) -> None:
        """Synchronous start for library use and tests (``start`` calls it). Idempotent."""
        with self._mover:
            if self._opened:
                return
            tiers = open_tiers(
                self.settings,
                data_dir=self.data_dir,
                snapshot=self._devices.snapshot(),
                cuda=self._cuda,
                new_index=self._policy.new_index,
                compression=self._compression,
                metrics=self._metrics,
            )
            self._state.set_tiers(tiers)
            self._top = tiers[0] if tiers else None
            self._dir_lock, self._catalog, found = open_data_dir(
                self._state, self.data_dir, fsync=self.settings.fsync, now=self._clock.monotonic()
            )
            report_recovery(found, self._metrics, self._events)
            self._opened = True
            self._closed = False
        for tier in self._state.tiers:
            self._metrics.publish(tier)
        if not self._state.tiers:
            log.info("memory tiers: none")
        for t in self._state.tiers:
            origin = f" ({t.spec.origin})" if t.spec.origin else ""
            log.info("memory tier %s: %s%s", t.name, format_size(t.capacity), origin)

    def close(self, *, spill: bool | None = None) -> None:
        """Spill (``memory.spill_on_stop`` unless ``spill`` says otherwise) and close."""
        with self._mover:
            if not self._opened or self._closed:
                return
            if self.settings.spill_on_stop if spill is None else spill:
                self.spill()
            if self._catalog is not None:
                self._catalog.close()
            if self._dir_lock is not None:
                self._dir_lock.release()
            self._closed = True
        self._moves.stop()

    def _require_open(self) -> None:
        if not self._opened or self._closed:
            raise ShuttingDown("the memory store is not running")

    # ------------------------------------------------------------------ public API

    @property
    def tiers(self) -> list[str]:
        """Names of the present tiers, fastest first."""
        return [t.name for t in self._state.tiers]

    def put(
        self,
        block_id: str,
        data: object,
        priority: int = 0,
        hint: str | None = None,
        *,
        durable: bool | None = None,
    ) -> str:
        """Store ``data`` (bytes, numpy array or torch tensor) under ``block_id``; returns the
        tier it landed in. Replaces an existing block of that id atomically (the old one stays
        if the new one finds no room). ``InsufficientMemory`` when no tier can take it,
        ``InsufficientStorage`` when the disk is full (nothing changed).

        ``durable`` (default ``memory.durable_puts``): place the block in L5/L6 only and return
        once it survives a crash (see :meth:`put_receipt` for what happened)."""
        return self.put_receipt(block_id, data, priority, hint, durable=durable).tier

    def put_receipt(
        self,
        block_id: str,
        data: object,
        priority: int = 0,
        hint: str | None = None,
        *,
        durable: bool | None = None,
    ) -> PutReceipt:
        """:meth:`put`, telling where the block landed and whether it survives a crash."""
        check_block_id(block_id)
        check_priority(priority)
        check_hint(hint)
        layout, value = describe(data)
        check_size(layout.nbytes, self.settings.max_block_size)
        wanted = self.settings.durable_puts if durable is None else bool(durable)
        with self._mover:
            self._require_open()
            return self._writer.put(block_id, layout, value, priority, hint, durable=wanted)

    def get(self, block_id: str) -> Any:
        """The block's data, byte-identical to what was put (``NotFound`` if unknown here and,
        with a ``remote``, on every peer).

        Records a hit; may promote the block (and prefetch the ones predicted next). Bytes come
        back as ``bytes``, arrays read-only, tensors shared (treat them as read-only).
        """
        try:
            return self._get_local(block_id)
        except NotFound:
            if self.remote is None:
                raise
        return self._get_remote(block_id)

    def _get_local(self, block_id: str) -> Any:
        now = self._clock.monotonic()
        with self._lock:
            entry = self._blocks.get(block_id)
            if entry is None:
                self._misses += 1
                raise NotFound(f"no block {block_id!r}")
            meta = entry.meta
            tier = self._by_name[meta.tier]
            ahead = self._policy.on_read(meta, now)
            tier.index.touch(meta, now)
            tier.hits += 1
            up = tier.up
            promote = (
                up is not None
                and not meta.pinned
                and self._policy.should_promote(meta, meta.tier, tier_view(up), now)
                and (up.is_disk or block_id not in self._state.durable)
            )
            if ahead:
                self._pending.queue(ahead, block_id, prefetched=True)
            if not promote and tier.host:  # the hit path: no I/O, no copy
                if entry.layout.kind is _NUMPY:
                    return entry.handle.view()
                return entry.handle
            meta.readers += 1
            handle = entry.handle
        start = time.perf_counter()
        try:
            value = tier.backend.read(handle, self._state.layout(entry), block_id)
        finally:
            self._moves.release(entry)
        if promote:
            self._pending.after_read(entry, tier, value, time.perf_counter() - start)
        return value

    def _get_remote(self, block_id: str) -> Any:
        """A block this node does not hold, from a peer (``remote``, the fastpath), kept here
        when ``remote_keep`` (as ``put`` would); ``NotFound`` when no peer has it either."""
        assert self.remote is not None
        data = self.remote(block_id)
        if self.remote_keep:
            with contextlib.suppress(InsufficientMemory, InsufficientStorage, Conflict):
                self.put(block_id, data)
        return data

    def read_bytes(self, block_id: str) -> tuple[bytes, dict[str, Any]]:
        """The block's raw bytes (as ``get``, so it counts as a hit) and its metadata."""
        value = self.get(block_id)
        layout, _ = describe(value)
        raw = value if isinstance(value, bytes) else bytes(raw_view(layout, value))
        with self._lock:
            entry = self._blocks.get(block_id)
            info = (
                self._describe(entry, self._clock.monotonic())
                if entry is not None
                else {"id": block_id, "size": len(raw), "kind": layout.kind.value}
            )
        return raw, info

    def peek_bytes(self, block_id: str) -> tuple[bytes, dict[str, Any]]:
        """The block's raw bytes and metadata without counting a hit or moving it (what HA
        replication ships of a block on a disk tier). ``NotFound`` if unknown."""
        with self._lock:
            entry = self._state.entry(block_id)
            tier = self._by_name[entry.meta.tier]
            info = self._describe(entry, self._clock.monotonic())
            entry.meta.readers += 1
            handle = entry.handle
        try:
            value = tier.backend.read(handle, self._state.layout(entry), block_id)
        finally:
            self._moves.release(entry)
        layout, _ = describe(value)
        raw = value if isinstance(value, bytes) else bytes(raw_view(layout, value))
        return raw, info

    def export(self, block_id: str) -> BlockExport:
        """The block as it leaves this node (``memory/exports.py``); ``NotFound`` if unknown.
        Close the export once sent."""
        fd = None
        with self._lock:
            handle = self._state.entry(block_id).handle
            if isinstance(handle, FileHandle) and handle.codec == "none":
                with contextlib.suppress(OSError):
                    fd = os.open(handle.path, os.O_RDONLY | os.O_CLOEXEC)
        export = from_file(fd, f"block {block_id!r}") if fd is not None else None
        return export if export is not None else from_bytes(self.peek_bytes(block_id)[0])

    def locate(self, block_id: str) -> str:
        """Name of the tier holding the block."""
        with self._lock:
            return self._state.entry(block_id).meta.tier

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def info(self, block_id: str) -> dict[str, Any]:
        """One block's metadata (no data)."""
        with self._lock:
            return self._describe(self._state.entry(block_id), self._clock.monotonic())

    def pin(self, block_id: str) -> None:
        """Keep the block where it is: it never moves until unpinned."""
        self._set_pinned(block_id, True)

    def unpin(self, block_id: str) -> None:
        self._set_pinned(block_id, False)

    def delete(self, block_id: str) -> None:
        """Remove the block (``NotFound`` if unknown). A reader still copying it finishes."""
        with self._mover:
            self._require_open()
            with self._lock:
                entry = self._state.entry(block_id)
                tier = self._by_name[entry.meta.tier]
                del self._blocks[block_id]
                self._pending.discard(block_id)
                self._state.durable.discard(block_id)
                frees = self._state.drop(entry, tier)
            # The file goes first: on a full disk its space is what lets the row go too.
            self._moves.free(frees, now=True)
            if tier.is_disk:
                self._moves.forget_row(block_id)
            self._metrics.publish(tier)
        self._events.publish(ev.BlockDeleted(id=block_id, tier=tier.name, size=entry.meta.size))

    def promote(self, block_id: str, tier: str | None = None) -> str:
        """Move the block up: to ``tier`` or, if None, to the fastest tier the placement
        accepts; makes room by demoting colder blocks. Returns the tier it is in."""
        return self._explicit_move(block_id, tier, upward=True)

    def demote(self, block_id: str, tier: str | None = None) -> str:
        """Move the block down: to ``tier`` or, if None, to the nearest lower tier with room
        (making room below if needed). Returns the tier it is in."""
        return self._explicit_move(block_id, tier, upward=False)

    def demote_many(self, block_ids: Iterable[str], tier: str | None = None) -> dict[str, str]:
        """:meth:`demote` of several blocks in one call; those bound for one disk tier are
        written as a batch (each file fsynced, their directory once, then their catalog rows
        in one commit). Returns the tier each block is in. Unknown or pinned blocks are
        refused (``NotFound``, ``Conflict``) before anything moves."""
        with self._mover:
            self._require_open()
            with self._lock:
                entries = [self._state.entry(i) for i in dict.fromkeys(block_ids)]
            return self._plan.demote_many(entries, self._tier(tier) if tier is not None else None)

    def prefetch(self, block_ids: str | Iterable[str]) -> int:
        """Hint that these blocks will be read soon: they are promoted ahead (by the
        maintenance loop when running, else now). Returns how many the store holds."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        for block_id in ids:
            check_block_id(block_id)
        with self._lock:
            known = [i for i in ids if i in self._blocks]
            self._pending.queue(known, None, prefetched=True)
        if not self._loop.running:
            self.run_pending()
        return len(known)

    def run_pending(self) -> int:
        """Promote the queued blocks (prefetches, promotions a busy get left); returns moves."""
        return self._pending.run()

    def evict_cycle(self, *, force: bool = False) -> dict[str, int]:
        """One eviction cycle: every tier above its pressure mark (or over a shrunk budget; or
        every tier when ``force``) demotes its coldest movable blocks down to its low mark.
        Returns ``{"moved": blocks, "bytes": bytes}``."""
        with self._mover:
            self._require_open()
            before = self._metrics.evictions_so_far()
            with tracing.span("memory.evict_cycle", force=force):
                for tier in self._state.tiers:
                    need = tier.need(0, force=force)
                    if need > 0 and tier.lower:
                        self._plan.free_bytes(tier, need, reason="evict")
                    self._settle_capacity(tier)
            return self._evicted_since(before)

    def evict(self, tier: str | None = None, nbytes: int | None = None) -> dict[str, int]:
        """Forced eviction: free ``nbytes`` from ``tier`` (default: down to the low mark), or
        a forced cycle over every tier when ``tier`` is None."""
        if tier is None:
            if nbytes is not None:
                raise InvalidInput("bytes needs a tier", field="bytes")
            return self.evict_cycle(force=True)
        with self._mover:
            self._require_open()
            state = self._tier(tier)
            before = self._metrics.evictions_so_far()
            need = nbytes if nbytes is not None else state.need(0, force=True)
            if need < 0:
                raise InvalidInput("bytes must not be negative", field="bytes")
            with tracing.span("memory.evict_cycle", tier=tier, force=True):
                if need > 0 and state.lower:
                    self._plan.free_bytes(state, need, reason="evict")
            return self._evicted_since(before)

    def _evicted_since(self, before: tuple[int, int]) -> dict[str, int]:
        moved, freed = self._metrics.evictions_so_far()
        return {"moved": moved - before[0], "bytes": freed - before[1]}

    def maintain(self) -> None:
        """One maintenance pass: queued promotions, then an eviction cycle."""
        if self._moves.stale_rows:
            with self._mover:
                self._moves.retry_stale_rows()
        self.run_pending()
        self.evict_cycle()

    def warmup(self, max_blocks: int = 64) -> int:
        """Promote the hottest blocks that sit below their best tier, where there is room
        (no eviction). Returns how many moved."""
        with self._mover:
            self._require_open()
            return self._plan.warmup(max_blocks)

    def compress_cold(self, max_blocks: int = 64) -> int:
        """Move the coldest L4 blocks (hotness at or under ``memory.cold_threshold``) to L5,
        compressed where it pays, where there is room. Returns how many moved."""
        with self._mover:
            self._require_open()
            return self._plan.compress(max_blocks)

    def spill(self) -> int:
        """Move every block of L1–L4 to L5/L6 where there is room (hottest first), so it
        survives a restart. Returns how many moved. Pinned blocks are spilled too."""
        with self._mover:
            return self._plan.spill()

    def set_capacity(self, tier: str, capacity_bytes: int) -> None:
        """Change a tier's budget. Shrinking demotes blocks until the tier fits; data is never
        dropped: while pinned blocks (or a full tier below) keep it above the budget, the
        effective capacity stays at what is used and later cycles keep shrinking it."""
        check_capacity(capacity_bytes)
        with self._mover:
            self._require_open()
            state = self._tier(tier)
            with self._lock:
                state.target = capacity_bytes
            if state.used > capacity_bytes and state.lower:
                self._plan.free_bytes(state, state.used - capacity_bytes, reason="capacity")
            self._settle_capacity(state)
        self._events.publish(
            ev.TierCapacityChanged(
                tier=state.name,
                capacity_bytes=state.capacity,
                target_capacity_bytes=state.target,
            )
        )

    def capacity(self, tier: str) -> int:
        """The tier's effective capacity in bytes (its budget, or what is used if more)."""
        return self._tier(tier).capacity

    def stats(self) -> dict[str, Any]:
        """Tiers (capacity, use, blocks, latency, compression) and move totals."""
        with self._lock:
            tiers = [tier_stats(t) for t in self._state.tiers]
            blocks = len(self._blocks)
            pinned = sum(1 for e in self._blocks.values() if e.meta.pinned)
            totals = dict(self._metrics.totals)
            pending = len(self._pending)
            misses = self._misses
        return {
            "tiers": tiers,
            "blocks": blocks,
            "bytes": sum(t["used_bytes"] for t in tiers),
            "pinned": pinned,
            "hits": sum(t["hits"] for t in tiers),
            "misses": misses,
            "pending_promotions": pending,
            **totals,
        }

    def list_blocks(
        self, *, limit: int = 100, offset: int = 0, tier: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """A page of blocks (insertion order) and the total count (of ``tier`` if given)."""
        check_page(limit, offset)
        if tier is not None:
            self._tier(tier)
        now = self._clock.monotonic()
        with self._lock:
            chosen, total = self._state.page(tier.upper() if tier else None, offset, limit)
            return [self._describe(e, now) for e in chosen], total

    # ------------------------------------------------------------------ growth

    def _after_growth(self, tier: Tier) -> None:
        """A tier grew: past its high mark, run (or wake) the eviction cycle."""
        if tier.used <= tier.spec.pressure_high * tier.target or not tier.lower:
            return
        if self._loop.running:
            self._loop.wake()
            return
        try:
            self.evict_cycle()
        except InsufficientStorage as exc:  # what grew is stored; the cycle runs again later
            log.warning("eviction cycle stopped: %s", exc.message)

    # ------------------------------------------------------------------ explicit moves

    def _explicit_move(self, block_id: str, tier: str | None, *, upward: bool) -> str:
        with self._mover:
            self._require_open()
            with self._lock:
                entry = self._state.entry(block_id)
                if entry.meta.pinned:
                    raise Conflict(f"block {block_id!r} is pinned; unpin it to move it")
                current = self._by_name[entry.meta.tier]
            wanted = self._tier(tier) if tier is not None else None
            target = self._plan.explicit_choice(entry, current, wanted, upward=upward)
            if target is None:
                return current.name
            if not self._moves.relocate(entry, target, "explicit"):
                raise Conflict(f"block {block_id!r} changed while being moved")
            if upward:
                self._after_growth(target)
            return target.name

    # ------------------------------------------------------------------ bookkeeping

    def _set_pinned(self, block_id: str, pinned: bool) -> None:
        with self._mover:
            self._require_open()
            with self._lock:
                entry = self._state.entry(block_id)
                entry.meta.pinned = pinned
                tier = self._by_name[entry.meta.tier]
                tier.index.touch(entry.meta, self._clock.monotonic())  # re-rank it
                on_disk = tier.is_disk
            if on_disk:
                self._db().set_pinned(block_id, pinned)
        self._events.publish(
            ev.BlockPinned(id=block_id) if pinned else ev.BlockUnpinned(id=block_id)
        )

    def flush(self) -> None:
        """Wait until every retired copy has been freed (files unlinked)."""
        self._moves.flush()

    def _settle_capacity(self, tier: Tier) -> None:
        with self._lock:
            tier.capacity = max(tier.target, tier.used)
        self._metrics.publish(tier)

    def _tier(self, name: str) -> Tier:
        tier = self._by_name.get(str(name).upper())
        if tier is None:
            present = ", ".join(self._by_name) or "none"
            raise NotFound(f"tier {name!r} is not present on this machine (present: {present})")
        return tier

    def _db(self) -> Catalog:
        assert self._catalog is not None
        return self._catalog

    def _describe(self, entry: Entry, now: float) -> dict[str, Any]:
        return self._state.describe(entry, round(self._hotness.score(entry.meta, now), 6))

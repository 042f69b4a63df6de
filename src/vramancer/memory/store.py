"""The tiered block store: real data in every tier, moved by hotness, never lost.

``TieredStore`` is the executor of the pure policies in ``memory/policy.py`` (hotness,
placement, eviction order, promotion, prefetch): it holds the data in tier backends
(``memory/backends.py``), keeps the accounting, moves blocks, persists the metadata of blocks
on disk (``memory/catalog.py``) and reports every move (events, metrics, spans).

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
import heapq
import itertools
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
from vramancer.memory.backends import (
    CudaBackend,
    DataKind,
    FileBackend,
    FileHandle,
    HostBackend,
    Layout,
    LayoutTable,
    PinnedBackend,
    TierBackend,
    describe,
    raw_view,
)
from vramancer.memory.catalog import BlockRow, Catalog
from vramancer.memory.catalog import check as check_catalog
from vramancer.memory.compression import (
    AdaptiveCompression,
    CompressionManager,
    CorruptBlock,
)
from vramancer.memory.policy import (
    BlockMeta,
    EvictionIndex,
    HotnessModel,
    OrchestratorStrategy,
    TierView,
    bytes_to_free,
    default_policy,
)
from vramancer.memory.recovery import Reconciled, reconcile
from vramancer.memory.settings import MemorySettings
from vramancer.memory.storage import DataDirLock
from vramancer.memory.tiers import DISK_TIERS, CudaDevice, TierName, TierSpec, resolve_tiers
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

#: Allowed block ids: letters, digits and ``. _ : / -``, 1 to 256 characters.
BLOCK_ID_RE = re.compile(r"[A-Za-z0-9._:/-]{1,256}")
#: Allowed hints: printable ASCII without control characters, at most 128 characters.
HINT_RE = re.compile(r"[\x20-\x7e]{1,128}")
MAX_PRIORITY = 1000
#: Largest offset (and limit) ``list_blocks`` accepts; the HTTP API's bound on offsets too.
MAX_LIST_OFFSET = 2**53
#: Reasons of downward moves that count as evictions (the rest are demotions on request).
_EVICT_REASONS = frozenset({"evict", "pressure", "capacity", "room"})


class BlockTooLarge(InvalidInput):
    """A block over ``memory.max_block_size``."""

    code = "payload_too_large"
    http_status = 413


@dataclass(frozen=True, slots=True)
class PutReceipt:
    """Where a put landed, and whether the block survives a crash from now on (it is in L5/L6,
    its file, directory and catalog row fsynced)."""

    tier: str
    durable: bool


class StorePolicy(Protocol):
    """What the store needs from a policy (``memory.policy.PolicyBundle`` is the default)."""

    @property
    def hotness(self) -> HotnessModel: ...

    @property
    def placement(self) -> OrchestratorStrategy: ...

    def new_index(self, reload_latency: float, tier: str | None) -> EvictionIndex: ...

    def on_put(self, block: BlockMeta) -> None: ...

    def on_read(self, block: BlockMeta, now: float) -> Sequence[str]: ...

    def should_promote(
        self, block: BlockMeta, from_tier: TierView | str, to_tier: TierView, now: float
    ) -> bool: ...


#: A NumPy block (the hit path hands out a read-only view of it).
_NUMPY = DataKind.NUMPY


@dataclass(slots=True, eq=False)
class _Entry:
    """A block: its policy metadata, how to rebuild it, and its backend handle.

    Three slots, no more: the store keeps one per block (a million blocks must stay under
    500 bytes each). ``layout`` is shared (``LayoutTable``); whether the entry is still the
    block's is ``store._blocks.get(id) is entry``; old copies waiting for readers are in
    ``store._deferred``.
    """

    meta: BlockMeta
    layout: Layout
    handle: Any


@dataclass(slots=True, eq=False)
class _Tier:
    """One present tier: its backend, budget, accounting and eviction index."""

    spec: TierSpec
    backend: TierBackend
    index: EvictionIndex
    #: Budget asked for (config, derived, or ``set_capacity``).
    target: int
    #: Effective capacity: the budget, or more while pinned blocks keep ``used`` above it.
    capacity: int
    used: int = 0
    blocks: int = 0
    stored: int = 0
    hits: int = 0
    #: L4: blocks are Python objects handed out as they are (bytes, read-only arrays).
    host: bool = False
    up: _Tier | None = None
    lower: list[_Tier] = field(default_factory=list)
    #: ``spec.name.value`` and whether the tier is L5/L6, kept as plain fields (read per op).
    name: str = field(init=False)
    is_disk: bool = field(init=False)
    #: This tier's children of the per-tier gauges (used, capacity, blocks, ratio).
    gauges: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        self.name = self.spec.name.value
        self.is_disk = self.spec.name in DISK_TIERS

    @property
    def free(self) -> int:
        return max(0, self.target - self.used)

    def view(self) -> TierView:
        spec = self.spec
        return TierView(
            self.name, spec.latency, self.target, self.used, spec.pressure_high, spec.pressure_low
        )


@dataclass(frozen=True, slots=True)
class _Move:
    """A finished move, reported after the locks are released."""

    block_id: str
    size: int
    source: str
    target: str
    reason: str
    seconds: float
    upward: bool


def check_block_id(block_id: object) -> str:
    """``block_id`` if allowed, else ``InvalidInput`` naming the allowed form."""
    if not isinstance(block_id, str) or not BLOCK_ID_RE.fullmatch(block_id):
        raise InvalidInput(
            "block id must be 1 to 256 characters of letters, digits and . _ : / - "
            f"(got {block_id!r:.80})",
            field="id",
        )
    return block_id


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInput(f"priority must be an integer (got {priority!r})", field="priority")
    if not 0 <= priority <= MAX_PRIORITY:
        raise InvalidInput(
            f"priority must be between 0 and {MAX_PRIORITY} (got {priority})", field="priority"
        )
    return priority


def check_hint(hint: object) -> str | None:
    if hint is None:
        return None
    if not isinstance(hint, str) or not HINT_RE.fullmatch(hint):
        raise InvalidInput("hint must be 1 to 128 printable ASCII characters", field="hint")
    return hint


class TieredStore:
    """Blocks of data in tiers L1–L6; see the module docstring for the rules it keeps."""

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
        self._metrics = metrics
        self._clock = clock
        self._policy: StorePolicy = policy if policy is not None else default_policy(settings)
        self._compression = compression
        self._cuda = cuda
        self._lock = threading.Lock()
        self._mover = threading.RLock()
        self._blocks: dict[str, _Entry] = {}
        self._layouts = LayoutTable()
        #: Old copies of blocks being read, freed when their last reader is done.
        self._deferred: dict[_Entry, list[tuple[_Tier, Any]]] = {}
        self._tiers: list[_Tier] = []
        self._by_name: dict[str, _Tier] = {}
        self._top: _Tier | None = None
        self._catalog: Catalog | None = None
        #: Blocks queued for promotion -> True for a prefetch (not read yet), False for a
        #: block that was read (a promotion a busy mover could not take at once).
        self._pending: dict[str, bool] = {}
        self._opened = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wake_sent = False
        self._task: asyncio.Task[None] | None = None
        self._totals = dict.fromkeys(("promotions", "demotions", "evictions", "bytes_moved"), 0)
        self._misses = 0
        self._evicted = 0
        self._reap_queue: queue.Queue[tuple[_Tier, Any] | None] = queue.Queue()
        self._reaper: threading.Thread | None = None
        #: Rows of deleted blocks that a full disk kept the catalog from removing (retried).
        self._stale_rows: set[str] = set()
        #: Blocks put durably: they stay on the disk tiers (never promoted into memory).
        self._durable: set[str] = set()
        self._dir_lock: DataDirLock | None = None
        self._init_metrics()
        # A damaged catalog is reported now, while the caller can still show a clean message
        # (``vramancer serve`` builds the runtime before it starts serving).
        check_catalog(self.data_dir / "memory.sqlite")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Resolve the tiers, recover the blocks on disk, start the maintenance loop."""
        await asyncio.to_thread(self.open)
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._maintenance(), name="vramancer-memory")

    async def stop(self) -> None:
        """Stop the loop, spill volatile blocks to disk where room (if configured), close."""
        task, self._task = self._task, None
        self._loop = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.close)

    def open(self) -> None:
        """Synchronous start for library use and tests (``start`` calls it). Idempotent."""
        with self._mover:
            if self._opened:
                return
            specs = resolve_tiers(
                self.settings,
                data_dir=self.data_dir,
                snapshot=self._devices.snapshot(),
                cuda=self._cuda,
            )
            self._build_tiers(specs)
            self._dir_lock = DataDirLock.acquire(self.data_dir)
            try:
                self._catalog = Catalog(self.data_dir / "memory.sqlite", fsync=self.settings.fsync)
                self._recover()
            except BaseException:
                self._dir_lock.release()
                raise
            self._opened = True
            self._closed = False
        for tier in self._tiers:
            self._publish_tier(tier)
        log.info(
            "memory tiers: %s",
            ", ".join(f"{t.name}={t.capacity}B" for t in self._tiers) or "none",
        )

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
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            self._reap_queue.put(None)
            reaper.join()

    def _build_tiers(self, specs: list[TierSpec]) -> None:
        manager = self._compression or AdaptiveCompression(self.settings.compression)
        tiers: list[_Tier] = []
        for position, spec in enumerate(specs):
            backend = self._backend_for(spec, manager)
            # A block evicted from this tier goes to (and is reloaded from) the next slower
            # one: its latency and learned reload cost rank this tier's victims. The slowest
            # tier evicts nothing; its own figures stand in.
            below = specs[position + 1] if position + 1 < len(specs) else spec
            index = self._policy.new_index(below.latency, below.name.value)
            tiers.append(
                _Tier(
                    spec, backend, index, target=spec.capacity_bytes, capacity=spec.capacity_bytes
                )
            )
        for position, tier in enumerate(tiers):
            tier.host = type(tier.backend) is HostBackend
            tier.up = tiers[position - 1] if position > 0 else None
            tier.lower = tiers[position + 1 :]
            tier.gauges = tuple(
                g.labels(tier=tier.name)
                for g in (self._g_used, self._g_capacity, self._g_blocks, self._g_ratio)
            )
        self._tiers = tiers
        self._by_name = {t.name: t for t in tiers}
        self._top = tiers[0] if tiers else None

    def _backend_for(self, spec: TierSpec, manager: CompressionManager) -> TierBackend:
        if spec.name in (TierName.L1, TierName.L2):
            return CudaBackend(spec.devices)
        if spec.name is TierName.L3:
            return PinnedBackend()
        if spec.name is TierName.L4:
            return HostBackend()
        assert spec.path is not None
        archive = spec.name is TierName.L6
        return FileBackend(
            spec.path.resolve(),
            compression=manager,
            decoder=manager,
            always_compress=archive,
            atomic=archive,
            fsync=self.settings.fsync,
        )

    def _recover(self) -> None:
        """Reconcile the catalog with the block files (``recovery.reconcile``) and load the
        blocks on disk."""
        assert self._catalog is not None
        now = self._clock.monotonic()
        dirs = {t.name: t.spec.path for t in self._tiers if t.is_disk and t.spec.path is not None}
        found = reconcile(self._catalog, dirs)
        for row in found.rows:
            tier = self._by_name[row.tier]
            assert tier.spec.path is not None
            layout = self._layouts.share(
                Layout(DataKind(row.kind), row.dtype, row.shape, row.itemsize, row.size)
            )
            meta = BlockMeta(
                id=row.id,
                size=row.size,
                tier=tier.name,
                priority=row.priority,
                pinned=row.pinned,
                hint=row.hint,
                hits=row.hits,
                last_access=now,
                created=now,
                compression=row.codec,
            )
            path = tier.spec.path.resolve() / row.file
            entry = _Entry(meta, layout, FileHandle(path, row.codec, row.stored_size))
            self._blocks[row.id] = entry
            if row.durable:
                self._durable.add(row.id)
            self._account_in(tier, entry, now)
        for tier in self._tiers:
            tier.capacity = max(tier.target, tier.used)
        self._report_recovery(found)

    def _report_recovery(self, found: Reconciled) -> None:
        for item in found.quarantined:
            self._c_quarantined.labels(tier=item.tier or "none", what=item.what).inc()
        if found.quarantined:
            log.warning(
                "memory: %d item(s) quarantined at start (files in <tier dir>/quarantine/, "
                "rows in the catalog's quarantine table)",
                len(found.quarantined),
            )
        if found.adopted:
            log.warning(
                "memory: %d block(s) had no catalog row; rebuilt from their block files",
                found.adopted,
            )
        for block_id in found.lost:
            log.error(
                "block %r lost: its file is gone (removed while the store was stopped, or "
                "deleted just before a crash)",
                block_id,
            )
            self._events.publish("block_lost", id=block_id, reason="file missing at start")

    def _entry(self, block_id: str) -> _Entry:
        """Lock held: the block's entry, or ``NotFound``."""
        entry = self._blocks.get(block_id)
        if entry is None:
            raise NotFound(f"no block {block_id!r}")
        return entry

    def _require_open(self) -> None:
        if not self._opened or self._closed:
            raise ShuttingDown("the memory store is not running")

    # ------------------------------------------------------------------ public API

    @property
    def tiers(self) -> list[str]:
        """Names of the present tiers, fastest first."""
        return [t.name for t in self._tiers]

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
        if layout.nbytes == 0:
            raise InvalidInput("a block cannot be empty", field="data")
        if layout.nbytes > self.settings.max_block_size:
            raise BlockTooLarge(
                f"block of {layout.nbytes} bytes is over memory.max_block_size "
                f"({self.settings.max_block_size})",
                requested_bytes=layout.nbytes,
                max_bytes=self.settings.max_block_size,
            )
        wanted = self.settings.durable_puts if durable is None else bool(durable)
        with self._mover:
            self._require_open()
            return self._put(block_id, layout, value, priority, hint, durable=wanted)

    def get(self, block_id: str) -> Any:
        """The block's data, byte-identical to what was put (``NotFound`` if unknown).

        Records a hit; may promote the block (and prefetch the ones predicted next). Bytes come
        back as ``bytes``, arrays read-only, tensors shared (treat them as read-only).
        """
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
                and self._policy.should_promote(meta, meta.tier, up.view(), now)
                and (up.is_disk or block_id not in self._durable)
            )
            if ahead:
                self._queue(ahead, block_id, prefetched=True)
            if not promote and tier.host:  # the hit path: no I/O, no copy
                if entry.layout.kind is _NUMPY:
                    return entry.handle.view()
                return entry.handle
            meta.readers += 1
            handle = entry.handle
        start = time.perf_counter()
        try:
            value = tier.backend.read(handle, self._layout(entry), block_id)
        finally:
            self._release(entry)
        if promote:
            self._promote_after_read(entry, tier, value, time.perf_counter() - start)
        return value

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

    def locate(self, block_id: str) -> str:
        """Name of the tier holding the block."""
        with self._lock:
            entry = self._entry(block_id)
            return entry.meta.tier

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def info(self, block_id: str) -> dict[str, Any]:
        """One block's metadata (no data)."""
        with self._lock:
            entry = self._entry(block_id)
            return self._describe(entry, self._clock.monotonic())

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
                entry = self._entry(block_id)
                tier = self._by_name[entry.meta.tier]
                del self._blocks[block_id]
                self._pending.pop(block_id, None)
                self._durable.discard(block_id)
                frees = self._drop(entry, tier)
            # The file goes first: on a full disk its space is what lets the row go too.
            self._free(frees, now=True)
            if tier.is_disk:
                self._forget_row(block_id)
            self._publish_tier(tier)
        self._events.publish("block_deleted", id=block_id, tier=tier.name, size=entry.meta.size)

    def promote(self, block_id: str, tier: str | None = None) -> str:
        """Move the block up: to ``tier`` or, if None, to the fastest tier the placement
        accepts; makes room by demoting colder blocks. Returns the tier it is in."""
        return self._explicit_move(block_id, tier, upward=True)

    def demote(self, block_id: str, tier: str | None = None) -> str:
        """Move the block down: to ``tier`` or, if None, to the nearest lower tier with room
        (making room below if needed). Returns the tier it is in."""
        return self._explicit_move(block_id, tier, upward=False)

    def prefetch(self, block_ids: str | Iterable[str]) -> int:
        """Hint that these blocks will be read soon: they are promoted ahead (by the
        maintenance loop when running, else now). Returns how many the store holds."""
        ids = [block_ids] if isinstance(block_ids, str) else list(block_ids)
        for block_id in ids:
            check_block_id(block_id)
        with self._lock:
            known = [i for i in ids if i in self._blocks]
            self._queue(known, None, prefetched=True)
        if self._loop is None:
            self.run_pending()
        return len(known)

    def run_pending(self) -> int:
        """Promote the queued blocks (prefetches, promotions a busy get left); returns moves."""
        with self._lock:
            queued = list(self._pending.items())
            self._pending.clear()
        moved = 0
        for block_id, prefetched in queued:
            with self._mover:
                if self._closed:
                    break
                moved += self._promote_queued(block_id, prefetched=prefetched)
        return moved

    def evict_cycle(self, *, force: bool = False) -> dict[str, int]:
        """One eviction cycle: every tier above its pressure mark (or over a shrunk budget; or
        every tier when ``force``) demotes its coldest movable blocks down to its low mark.
        Returns ``{"moved": blocks, "bytes": bytes}``."""
        with self._mover:
            self._require_open()
            before = (self._totals["evictions"], self._evicted_bytes())
            with tracing.span("memory.evict_cycle", force=force):
                for tier in self._tiers:
                    need = self._bytes_to_free(tier, 0, force=force)
                    if need > 0 and tier.lower:
                        self._free_bytes(tier, need, reason="evict")
                    self._settle_capacity(tier)
            moved = self._totals["evictions"] - before[0]
            freed = self._evicted_bytes() - before[1]
        return {"moved": moved, "bytes": freed}

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
            before = (self._totals["evictions"], self._evicted_bytes())
            need = nbytes if nbytes is not None else self._bytes_to_free(state, 0, force=True)
            if need < 0:
                raise InvalidInput("bytes must not be negative", field="bytes")
            with tracing.span("memory.evict_cycle", tier=tier, force=True):
                if need > 0 and state.lower:
                    self._free_bytes(state, need, reason="evict")
            return {
                "moved": self._totals["evictions"] - before[0],
                "bytes": self._evicted_bytes() - before[1],
            }

    def maintain(self) -> None:
        """One maintenance pass: queued promotions, then an eviction cycle."""
        self._retry_stale_rows()
        self.run_pending()
        self.evict_cycle()

    def _forget_row(self, block_id: str) -> None:
        """Mover held: remove a deleted block's row. A full disk only postpones it (the row
        names a file that is gone, which a restart drops too): the delete still succeeds."""
        try:
            self._db().delete(block_id)
        except InsufficientStorage:
            log.warning("disk full: the catalog row of deleted block %r is removed later", block_id)
            self._stale_rows.add(block_id)
        else:
            self._stale_rows.discard(block_id)

    def _retry_stale_rows(self) -> None:
        if not self._stale_rows:
            return
        with self._mover:
            for block_id in list(self._stale_rows):
                entry = self._blocks.get(block_id)
                if entry is not None and self._by_name[entry.meta.tier].is_disk:
                    self._stale_rows.discard(block_id)  # put again since: its row is current
                    continue
                self._forget_row(block_id)

    def warmup(self, max_blocks: int = 64) -> int:
        """Promote the hottest blocks that sit below their best tier, where there is room
        (no eviction). Returns how many moved."""
        now = self._clock.monotonic()
        with self._mover:
            self._require_open()
            with self._lock:
                hotness = self._policy.hotness
                floor = self.settings.cold_threshold
                candidates = [
                    (hotness.score(e.meta, now), e)
                    for e in self._blocks.values()
                    if not e.meta.pinned and self._by_name[e.meta.tier].up is not None
                ]
                hottest = heapq.nlargest(max_blocks, candidates, key=lambda c: c[0])
            moved = 0
            for score, entry in hottest:
                if score <= floor:
                    break
                target = self._upward_target(entry, now, room_only=True)
                if target is not None and self._relocate(entry, target, reason="warmup"):
                    moved += 1
        return moved

    def compress_cold(self, max_blocks: int = 64) -> int:
        """Move the coldest L4 blocks (hotness at or under ``memory.cold_threshold``) to L5,
        compressed where it pays, where there is room. Returns how many moved."""
        now = self._clock.monotonic()
        with self._mover:
            self._require_open()
            host = self._by_name.get(TierName.L4.value)
            if host is None:
                return 0
            disk = [t for t in host.lower if t.is_disk]
            with self._lock:
                hotness = self._policy.hotness
                floor = self.settings.cold_threshold
                cold = [
                    (hotness.score(e.meta, now), e)
                    for e in self._blocks.values()
                    if e.meta.tier == host.name and not e.meta.pinned and e.meta.readers == 0
                ]
                coldest = heapq.nsmallest(max_blocks, cold, key=lambda c: c[0])
            moved = 0
            for score, entry in coldest:
                if score > floor:
                    break
                target = next((t for t in disk if t.free >= entry.meta.size), None)
                if target is not None and self._relocate(entry, target, reason="compress"):
                    moved += 1
        return moved

    def spill(self) -> int:
        """Move every block of L1–L4 to L5/L6 where there is room (hottest first), so it
        survives a restart. Returns how many moved. Pinned blocks are spilled too."""
        now = self._clock.monotonic()
        moved = 0
        with self._mover:
            with self._lock:
                hotness = self._policy.hotness
                volatile = sorted(
                    (e for e in self._blocks.values() if not self._by_name[e.meta.tier].is_disk),
                    key=lambda e: -hotness.score(e.meta, now),
                )
            disk = [t for t in self._tiers if t.is_disk]
            for entry in volatile:
                target = next((t for t in disk if t.free >= entry.meta.size), None)
                if target is None:
                    continue
                try:
                    if self._relocate(entry, target, reason="spill", allow_pinned=True):
                        moved += 1
                except (CorruptBlock, OSError, InsufficientStorage):
                    log.exception("could not spill block %r", entry.meta.id)
        return moved

    def set_capacity(self, tier: str, capacity_bytes: int) -> None:
        """Change a tier's budget. Shrinking demotes blocks until the tier fits; data is never
        dropped: while pinned blocks (or a full tier below) keep it above the budget, the
        effective capacity stays at what is used and later cycles keep shrinking it."""
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise InvalidInput("capacity_bytes must be an integer", field="capacity_bytes")
        if capacity_bytes < 0:
            raise InvalidInput("capacity_bytes must not be negative", field="capacity_bytes")
        with self._mover:
            self._require_open()
            state = self._tier(tier)
            with self._lock:
                state.target = capacity_bytes
            if state.used > capacity_bytes and state.lower:
                self._free_bytes(state, state.used - capacity_bytes, reason="capacity")
            self._settle_capacity(state)
            self._publish_tier(state)
        self._events.publish(
            "tier_capacity_changed",
            tier=state.name,
            capacity_bytes=state.capacity,
            target_capacity_bytes=state.target,
        )

    def capacity(self, tier: str) -> int:
        """The tier's effective capacity in bytes (its budget, or what is used if more)."""
        return self._tier(tier).capacity

    def stats(self) -> dict[str, Any]:
        """Tiers (capacity, use, blocks, latency, compression) and move totals."""
        with self._lock:
            tiers = [self._tier_stats(t) for t in self._tiers]
            blocks = len(self._blocks)
            pinned = sum(1 for e in self._blocks.values() if e.meta.pinned)
            totals = dict(self._totals)
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
        for name, value in (("limit", limit), ("offset", offset)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"{name} must be an integer (got {value!r:.40})", field=name)
            if not 0 <= value <= MAX_LIST_OFFSET:
                raise InvalidInput(
                    f"{name} must be from 0 to {MAX_LIST_OFFSET} (got {value})", field=name
                )
        if tier is not None:
            self._tier(tier)
        now = self._clock.monotonic()
        with self._lock:
            if tier is None:
                total = len(self._blocks)
                chosen: Iterable[_Entry] = self._blocks.values()
            else:
                matching = [e for e in self._blocks.values() if e.meta.tier == tier.upper()]
                total = len(matching)
                chosen = matching
            page = [
                self._describe(e, now) for e in itertools.islice(chosen, offset, offset + limit)
            ]
        return page, total

    # ------------------------------------------------------------------ put / placement

    def _put(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        priority: int,
        hint: str | None,
        *,
        durable: bool,
    ) -> PutReceipt:
        now = self._clock.monotonic()
        meta = BlockMeta(
            id=block_id,
            size=layout.nbytes,
            tier="",
            priority=priority,
            hint=hint,
            last_access=now,
            created=now,
        )
        with self._lock:
            self._policy.on_put(meta)
            views = [t.view() for t in self._tiers]
        with tracing.span("orch.place_block", block_id=block_id, size=meta.size) as span:
            order = self._policy.placement.place(meta, views, now)
            if durable:
                order = self._disk_order(order, meta.size)
            tier = self._room_for_new(meta, order)
            if span is not None:
                span.set_attribute("tier", tier.name if tier else "none")
        if tier is None:
            with self._lock:
                available = max((t.free for t in self._tiers), default=0)
            raise InsufficientMemory(
                f"no tier has room for a block of {meta.size} bytes",
                requested_bytes=meta.size,
                available_bytes=available,
            )
        meta.tier = tier.name
        handle = tier.backend.write(
            block_id,
            layout,
            value,
            owned=False,
            hint=hint,
            record=self._record(meta, layout, durable) if tier.is_disk else None,
            durable=durable,
        )
        entry = _Entry(meta, self._layouts.share(layout), handle)
        with self._lock:
            old = self._blocks.get(block_id)
        try:
            if tier.is_disk:
                self._db().upsert(self._row(entry, now, durable=durable), force_sync=durable)
            elif old is not None and self._by_name[old.meta.tier].is_disk:
                self._db().delete(block_id)
        except BaseException:
            tier.backend.free(handle)
            raise
        frees: list[tuple[_Tier, Any]] = []
        with self._lock:
            old = self._blocks.get(block_id)
            if old is not None:
                old_tier = self._by_name[old.meta.tier]
                frees = self._drop(old, old_tier)
            self._blocks[block_id] = entry
            if durable:
                self._durable.add(block_id)
            else:
                self._durable.discard(block_id)
            self._account_in(tier, entry, now)
        self._free(frees)
        if old is not None and old_tier is not tier:
            self._publish_tier(old_tier)
        self._publish_tier(tier)
        self._events.publish("block_put", id=block_id, tier=tier.name, size=meta.size)
        self._after_growth(tier)
        return PutReceipt(tier.name, tier.is_disk and (durable or self.settings.fsync))

    def _disk_order(self, order: Sequence[str], size: int) -> list[str]:
        """The disk tiers of a placement ``order`` (all disk tiers, fastest first, if it names
        none): where a durable put may land."""
        disk = [n for n in order if n in self._by_name and self._by_name[n].is_disk]
        if not disk:
            disk = [t.name for t in self._tiers if t.is_disk and t.target >= size]
        if not disk:
            raise Conflict(
                "a durable put needs a disk tier (L5 or L6) that can hold "
                f"{size} bytes, and none is present",
                requested_bytes=size,
            )
        return disk

    def _record(self, meta: BlockMeta, layout: Layout, durable: bool) -> dict[str, Any]:
        """What a block file says about its block (``blockfile.py``), to rebuild its row."""
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

    def _room_for_new(self, meta: BlockMeta, order: Sequence[str]) -> _Tier | None:
        """The first tier of ``order`` that has room, after demoting victims if needed."""
        for name in order:
            tier = self._by_name.get(name)
            if tier is None or meta.size > tier.target:
                continue
            if tier.free >= meta.size:
                return tier
            if tier.lower:
                self._free_bytes(tier, self._bytes_to_free(tier, meta.size), reason="room")
                if tier.free >= meta.size:
                    return tier
        return None

    def _bytes_to_free(self, tier: _Tier, incoming: int, *, force: bool = False) -> int:
        """Bytes to demote so ``incoming`` fits and, above the high mark (or ``force``), the
        tier drops to its low mark; also what a shrunk budget asks for."""
        spec = tier.spec
        return bytes_to_free(
            tier.used, tier.target, incoming, spec.pressure_high, spec.pressure_low, force=force
        )

    def _fits(self, tier: _Tier, size: int) -> bool:
        """Whether ``size`` more bytes keep ``tier`` at or under its high mark (a promotion
        that passed it would make the eviction cycle push warmer blocks out)."""
        return self._bytes_to_free(tier, size) == 0

    def _after_growth(self, tier: _Tier) -> None:
        """A tier grew: past its high mark, run (or wake) the eviction cycle."""
        if tier.used <= tier.spec.pressure_high * tier.target or not tier.lower:
            return
        if self._loop is not None:
            self._wake_loop()
            return
        try:
            self.evict_cycle()
        except InsufficientStorage as exc:  # what grew is stored; the cycle runs again later
            log.warning("eviction cycle stopped: %s", exc.message)

    # ------------------------------------------------------------------ moves

    def _free_bytes(
        self, tier: _Tier, need: int, *, reason: str, colder_than: float | None = None
    ) -> int:
        """Demote victims of ``tier`` (cascading) until ``need`` bytes are free; returns bytes
        freed. ``colder_than``: only victims with a lower hotness score (for promotions)."""
        if need <= 0 or not tier.lower:
            return 0
        now = self._clock.monotonic()
        with self._lock:
            victims = tier.index.victims(need, now)
            if colder_than is not None:
                hotness = self._policy.hotness
                if any(hotness.score(v, now) >= colder_than for v in victims):
                    return 0
        freed = 0
        for victim in victims:
            if freed >= need:
                break
            entry = self._blocks.get(victim.id)
            if entry is None or entry.meta is not victim or victim.tier != tier.name:
                continue
            target = self._room_below(tier, victim.size)
            if target is None:
                break
            try:
                if self._relocate(entry, target, reason=reason):
                    freed += victim.size
            except CorruptBlock:
                log.exception("block %r is corrupted; it stays in %s", victim.id, tier.name)
        return freed

    def _room_below(self, tier: _Tier, size: int) -> _Tier | None:
        """The nearest lower tier with room for ``size`` bytes, making room there if needed."""
        for lower in tier.lower:
            if lower.free >= size:
                return lower
        for lower in tier.lower:
            if size <= lower.target and lower.lower:
                self._free_bytes(lower, self._bytes_to_free(lower, size), reason="evict")
                if lower.free >= size:
                    return lower
        return None

    def _relocate(
        self,
        entry: _Entry,
        target: _Tier,
        *,
        reason: str,
        value: Any = None,
        owned: bool = False,
        allow_pinned: bool = False,
        read_s: float = 0.0,
        prefetched: bool = False,
    ) -> bool:
        """Move ``entry`` to ``target`` (mover held; room checked by the caller). Copies
        outside the lock; the old copy is freed after the switch, or when its last reader is
        done. Returns False if the block changed meanwhile (deleted, pinned).

        ``value``: the block's data when the caller already read it (``read_s`` seconds, counted
        in the move's time). ``prefetched``: a promotion ahead of the reader (the target's
        index keeps it apart until its read comes)."""
        meta = entry.meta
        with self._lock:
            if (
                self._blocks.get(meta.id) is not entry
                or (meta.pinned and not allow_pinned)
                or meta.tier == target.name
            ):
                return False
            if target.free < meta.size:
                return False
            source = self._by_name[meta.tier]
            meta.readers += 1
            handle = entry.handle
        layout = self._layout(entry)
        upward = target.spec.latency < source.spec.latency
        start = time.perf_counter()
        name = "memory.promote" if upward else "memory.demote"
        try:
            with tracing.span(name, block_id=meta.id, source=source.name, target=target.name):
                if value is None:
                    value = source.backend.read(handle, layout, meta.id)
                    owned = source.is_disk
                new_handle = target.backend.write(
                    meta.id,
                    layout,
                    value,
                    owned=owned,
                    hint=meta.hint,
                    record=(
                        self._record(meta, layout, meta.id in self._durable)
                        if target.is_disk
                        else None
                    ),
                )
                try:
                    if target.is_disk:
                        # From volatile memory, a crash loses the block anyway: no fsync of
                        # the row. Between L5 and L6 the old file goes away: durable.
                        row = self._row(entry, self._clock.monotonic(), target, new_handle)
                        self._db().upsert(row, durable=source.is_disk)
                    elif source.is_disk:
                        self._db().delete(meta.id, durable=False)
                except BaseException:
                    target.backend.free(new_handle)
                    raise
        except BaseException:
            self._release(entry)
            raise
        seconds = time.perf_counter() - start + read_s
        now = self._clock.monotonic()
        with self._lock:
            meta.readers -= 1
            self._account_out(source, entry)
            meta.tier = target.name
            entry.handle = new_handle
            self._account_in(target, entry, now, prefetched=prefetched)
            frees = self._retire(entry, source, handle)
            self._count_move(meta.size, upward, reason)
        self._free(frees)
        self._report(_Move(meta.id, meta.size, source.name, target.name, reason, seconds, upward))
        return True

    def _promote_after_read(self, entry: _Entry, source: _Tier, value: Any, read_s: float) -> None:
        """Promote a block just read (we hold its value, read in ``read_s``: no second read).
        Only if no other move is running; otherwise it is queued for the maintenance loop."""
        if not self._mover.acquire(blocking=False):
            with self._lock:
                self._queue([entry.meta.id], None, prefetched=False)
            return
        try:
            up = source.up
            if self._closed or up is None or entry.meta.tier != source.name:
                return
            now = self._clock.monotonic()
            size = entry.meta.size
            need = self._bytes_to_free(up, size)
            if need > 0:  # only blocks colder than this one make room for it
                score = self._policy.hotness.score(entry.meta, now)
                self._free_bytes(up, need, reason="room", colder_than=score)
            if self._fits(up, size):
                self._relocate(
                    entry, up, reason="hit", value=value, owned=source.is_disk, read_s=read_s
                )
                self._after_growth(up)
        except CorruptBlock:
            log.exception("promotion of %r failed", entry.meta.id)
        except InsufficientStorage as exc:  # the read itself succeeded
            log.warning("promotion of %r skipped: %s", entry.meta.id, exc.message)
        finally:
            self._mover.release()

    def _promote_queued(self, block_id: str, *, prefetched: bool) -> int:
        """Promote a queued block (a prefetch, or a read whose promotion found the mover busy)
        to the fastest tier with room for it, evicting only blocks colder than the promotion
        threshold. Mover held."""
        entry = self._blocks.get(block_id)
        if entry is None or entry.meta.pinned:
            return 0
        now = self._clock.monotonic()
        target = self._upward_target(entry, now, room_only=False)
        if target is None:
            return 0
        try:
            moved = self._relocate(
                entry,
                target,
                reason="prefetch" if prefetched else "hit",
                prefetched=prefetched,
            )
        except CorruptBlock:
            log.exception("prefetch of %r failed", block_id)
            return 0
        except InsufficientStorage as exc:
            log.warning("prefetch of %r skipped: %s", block_id, exc.message)
            return 0
        if moved:
            self._after_growth(target)
        return int(moved)

    def _upward_target(self, entry: _Entry, now: float, *, room_only: bool) -> _Tier | None:
        """The fastest tier above the block's that placement accepts and that has room
        (``room_only``) or can make room from blocks colder than the promotion threshold."""
        current = self._by_name[entry.meta.tier]
        with self._lock:
            views = [t.view() for t in self._tiers]
            order = self._policy.placement.place(entry.meta, views, now)
        above = [
            self._by_name[n]
            for n in order
            if n in self._by_name
            and self._by_name[n].spec.latency < current.spec.latency
            and self._may_hold(entry, self._by_name[n])
        ]
        size = entry.meta.size
        for tier in above:
            if self._fits(tier, size):
                return tier
        if room_only:
            return None
        for tier in above:
            if size <= tier.target:
                need = self._bytes_to_free(tier, size)
                self._free_bytes(
                    tier, need, reason="room", colder_than=self.settings.promote_threshold
                )
                if self._fits(tier, size):
                    return tier
        return None

    def _may_hold(self, entry: _Entry, tier: _Tier) -> bool:
        """Whether ``tier`` may hold the block: a durable block stays on the disk tiers."""
        return tier.is_disk or entry.meta.id not in self._durable

    def _explicit_move(self, block_id: str, tier: str | None, *, upward: bool) -> str:
        with self._mover:
            self._require_open()
            with self._lock:
                entry = self._entry(block_id)
                if entry.meta.pinned:
                    raise Conflict(f"block {block_id!r} is pinned; unpin it to move it")
                current = self._by_name[entry.meta.tier]
            target = self._explicit_target(entry, current, tier, upward=upward)
            if target is None:
                return current.name
            if not self._relocate(entry, target, reason="explicit"):
                raise Conflict(f"block {block_id!r} changed while being moved")
            if upward:
                self._after_growth(target)
            return target.name

    def _explicit_target(
        self, entry: _Entry, current: _Tier, tier: str | None, *, upward: bool
    ) -> _Tier | None:
        size = entry.meta.size
        if tier is not None:
            target = self._tier(tier)
            faster = target.spec.latency < current.spec.latency
            if target is current:
                return None
            if not self._may_hold(entry, target):
                raise Conflict(
                    f"block {entry.meta.id!r} was put durably: it stays on a disk tier "
                    "(put it again without durable to let it move into memory)"
                )
            if faster != upward:
                way = "up" if upward else "down"
                raise InvalidInput(f"{tier} is not {way} from {current.name}", field="tier")
            if size > target.target:
                raise InsufficientMemory(
                    f"{tier} cannot hold a block of {size} bytes",
                    requested_bytes=size,
                    available_bytes=target.free,
                )
            if target.free < size and target.lower:
                self._free_bytes(target, self._bytes_to_free(target, size), reason="room")
            if target.free < size:
                raise InsufficientMemory(
                    f"no room in {tier} for {size} bytes",
                    requested_bytes=size,
                    available_bytes=target.free,
                )
            return target
        if upward:
            if current.up is None or not self._may_hold(entry, current.up):
                return None
            now = self._clock.monotonic()
            found = self._upward_target(entry, now, room_only=True)
            if found is None:
                found = self._explicit_target(entry, current, current.up.name, upward=True)
            return found
        if not current.lower:
            return None
        found_below = self._room_below(current, size)
        if found_below is None:
            raise InsufficientMemory(
                f"no tier below {current.name} has room for {size} bytes",
                requested_bytes=size,
                available_bytes=max(t.free for t in current.lower),
            )
        return found_below

    # ------------------------------------------------------------------ bookkeeping

    def _set_pinned(self, block_id: str, pinned: bool) -> None:
        with self._mover:
            self._require_open()
            with self._lock:
                entry = self._entry(block_id)
                entry.meta.pinned = pinned
                tier = self._by_name[entry.meta.tier]
                tier.index.touch(entry.meta, self._clock.monotonic())  # re-rank it
                on_disk = tier.is_disk
            if on_disk:
                self._db().set_pinned(block_id, pinned)
        self._events.publish("block_pinned" if pinned else "block_unpinned", id=block_id)

    def _account_in(
        self, tier: _Tier, entry: _Entry, now: float, *, prefetched: bool = False
    ) -> None:
        """Lock held: the block is now in ``tier`` (``prefetched``: promoted ahead of its
        read, which the index keeps apart and evicts last until the read comes)."""
        meta = entry.meta
        meta.tier = tier.name
        meta.compression = tier.backend.codec(entry.handle)
        tier.used += meta.size
        tier.blocks += 1
        tier.stored += tier.backend.stored_bytes(entry.handle)
        tier.index.add(meta, now, prefetched=prefetched)

    def _account_out(self, tier: _Tier, entry: _Entry) -> None:
        """Lock held: the block leaves ``tier``."""
        meta = entry.meta
        tier.index.remove(meta)
        tier.used -= meta.size
        tier.blocks -= 1
        tier.stored -= tier.backend.stored_bytes(entry.handle)
        if tier.capacity > tier.target:
            tier.capacity = max(tier.target, tier.used)

    def _drop(self, entry: _Entry, tier: _Tier) -> list[tuple[_Tier, Any]]:
        """Lock held: remove a deleted or replaced block; returns what to free now."""
        self._account_out(tier, entry)
        return self._retire(entry, tier, entry.handle)

    def _retire(self, entry: _Entry, tier: _Tier, handle: Any) -> list[tuple[_Tier, Any]]:
        """Lock held: an old copy is no longer the block's; free it now or after the readers."""
        if entry.meta.readers == 0:
            return [(tier, handle)]
        self._deferred.setdefault(entry, []).append((tier, handle))
        return []

    def _release(self, entry: _Entry) -> None:
        """A reader is done; the last one frees what was retired meanwhile."""
        with self._lock:
            entry.meta.readers -= 1
            frees: list[tuple[_Tier, Any]] = []
            if entry.meta.readers == 0 and self._deferred:
                frees = self._deferred.pop(entry, [])
        self._free(frees)

    def _free(self, frees: list[tuple[_Tier, Any]], *, now: bool = False) -> None:
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

    def _reap(self, tier: _Tier, handle: Any) -> None:
        with self._lock:
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

    def _settle_capacity(self, tier: _Tier) -> None:
        with self._lock:
            tier.capacity = max(tier.target, tier.used)
        self._publish_tier(tier)

    def _queue(self, ids: Iterable[str], current: str | None, *, prefetched: bool) -> None:
        """Lock held: queue blocks for promotion by the maintenance loop (``prefetched``: ahead
        of their read; a block queued both ways counts as read)."""
        top = self._top
        limit = self.settings.max_pending_promotions
        added = False
        for block_id in ids:
            if block_id == current:
                continue
            entry = self._blocks.get(block_id)
            if entry is None or entry.meta.pinned or self._by_name[entry.meta.tier] is top:
                continue
            self._pending[block_id] = prefetched and self._pending.get(block_id, True)
            added = True
            if len(self._pending) > limit:
                del self._pending[next(iter(self._pending))]
        if added and self._loop is not None:
            self._wake_loop()

    def _wake_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or self._wake_sent:
            return
        self._wake_sent = True
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    async def _maintenance(self) -> None:
        """Periodic eviction cycle, and promotions queued by reads and prefetch hints."""
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.eviction_interval_s)
            self._wake.clear()
            self._wake_sent = False
            try:
                await asyncio.to_thread(self.maintain)
            except ShuttingDown:
                return
            except InsufficientStorage as exc:
                log.warning("memory maintenance: %s", exc.message)
            except Exception:
                log.exception("memory maintenance failed")

    def _tier(self, name: str) -> _Tier:
        tier = self._by_name.get(str(name).upper())
        if tier is None:
            present = ", ".join(self._by_name) or "none"
            raise NotFound(f"tier {name!r} is not present on this machine (present: {present})")
        return tier

    def _db(self) -> Catalog:
        assert self._catalog is not None
        return self._catalog

    def _row(
        self,
        entry: _Entry,
        now: float,
        tier: _Tier | None = None,
        handle: Any = None,
        *,
        durable: bool | None = None,
    ) -> BlockRow:
        meta, layout = entry.meta, self._layout(entry)
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
            hits=self._policy.hotness.score(meta, now),
            created=self._clock.time(),
            durable=meta.id in self._durable if durable is None else durable,
        )

    def _layout(self, entry: _Entry) -> Layout:
        """The entry's complete layout (bytes blocks share one without their size)."""
        return self._layouts.full(entry.layout, entry.meta.size)

    def _describe(self, entry: _Entry, now: float) -> dict[str, Any]:
        meta = entry.meta
        layout = self._layout(entry)
        return {
            "id": meta.id,
            "size": meta.size,
            "tier": meta.tier,
            "pinned": meta.pinned,
            "priority": meta.priority,
            "hint": meta.hint,
            "kind": layout.kind.value,
            "dtype": layout.dtype,
            "shape": list(layout.shape),
            "compression": meta.compression,
            "hotness": round(self._policy.hotness.score(meta, now), 6),
        }

    def _tier_stats(self, tier: _Tier) -> dict[str, Any]:
        ratio = tier.used / tier.stored if tier.stored else 1.0
        return {
            "name": tier.name,
            "latency": tier.spec.latency,
            "capacity_bytes": tier.capacity,
            "target_capacity_bytes": tier.target,
            "used_bytes": tier.used,
            "free_bytes": tier.free,
            "blocks": tier.blocks,
            "pressure": round(tier.used / tier.capacity, 6) if tier.capacity else 0.0,
            "stored_bytes": tier.stored,
            "compression_ratio": round(ratio, 6),
            "hits": tier.hits,
            "path": str(tier.spec.path) if tier.spec.path else None,
            "devices": list(tier.spec.devices),
        }

    # ------------------------------------------------------------------ observability

    def _init_metrics(self) -> None:
        m = self._metrics
        self._g_used = m.gauge(
            "vramancer_memory_tier_used_bytes", "Bytes of blocks held in each tier.", ["tier"]
        )
        self._g_capacity = m.gauge(
            "vramancer_memory_tier_capacity_bytes", "Effective capacity of each tier.", ["tier"]
        )
        self._g_blocks = m.gauge("vramancer_memory_blocks", "Blocks held in each tier.", ["tier"])
        self._g_ratio = m.gauge(
            "vramancer_memory_compression_ratio",
            "Raw bytes over stored bytes of the blocks in each tier (1: uncompressed).",
            ["tier"],
        )
        self._c_promotions = m.counter(
            "vramancer_memory_promotions_total", "Blocks moved up, by destination tier.", ["tier"]
        )
        self._c_demotions = m.counter(
            "vramancer_memory_demotions_total", "Blocks moved down, by destination tier.", ["tier"]
        )
        self._c_evictions = m.counter(
            "vramancer_memory_evictions_total",
            "Blocks pushed out of a tier by pressure or a smaller budget, by source tier.",
            ["tier"],
        )
        self._c_quarantined = m.counter(
            "vramancer_memory_quarantined_blocks_total",
            "Block files moved into <tier dir>/quarantine/ and catalog rows moved into the "
            "catalog's quarantine table, because they could not be read or accounted for.",
            ["tier", "what"],
        )
        self._c_moved = m.counter(
            "vramancer_memory_bytes_moved_total",
            "Bytes moved between tiers, by destination.",
            ["tier"],
        )

    def _publish_tier(self, tier: _Tier) -> None:
        used, capacity, blocks, ratio = tier.gauges
        used.set(tier.used)
        capacity.set(tier.capacity)
        blocks.set(tier.blocks)
        ratio.set(tier.used / tier.stored if tier.stored else 1.0)

    def _evicted_bytes(self) -> int:
        return self._evicted

    def _count_move(self, size: int, upward: bool, reason: str) -> None:
        """Lock held: totals for ``stats()``."""
        totals = self._totals
        totals["promotions" if upward else "demotions"] += 1
        totals["bytes_moved"] += size
        if not upward and reason in _EVICT_REASONS:
            totals["evictions"] += 1
            self._evicted += size

    def _report(self, move: _Move) -> None:
        """Metrics and one event per move, after the lock is released."""
        if move.upward:
            self._c_promotions.labels(tier=move.target).inc()
            kind = "block_promoted"
        else:
            self._c_demotions.labels(tier=move.target).inc()
            kind = "block_evicted" if move.reason in _EVICT_REASONS else "block_demoted"
            if move.reason in _EVICT_REASONS:
                self._c_evictions.labels(tier=move.source).inc()
        self._c_moved.labels(tier=move.target).inc(move.size)
        for name in (move.source, move.target):
            self._publish_tier(self._by_name[name])
        # A move up is a reload from its source tier: what the eviction ranking of the tier
        # above that one counts as the cost of evicting a block (moves down measure writes).
        costs = getattr(self._policy, "costs", None)
        if move.upward and costs is not None and hasattr(costs, "observe"):
            with self._lock:
                costs.observe(move.source, move.size, move.seconds)
        self._events.publish(
            kind,
            id=move.block_id,
            size=move.size,
            source=move.source,
            target=move.target,
            reason=move.reason,
            seconds=round(move.seconds, 6),
        )

"""Opening the tiered store: the tiers' backends and indexes, and the blocks found on disk."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from vramancer import event_types as ev
from vramancer.devices.types import SystemSnapshot
from vramancer.events import EventBus
from vramancer.memory.backends import (
    CudaBackend,
    DataKind,
    FileBackend,
    FileHandle,
    HostBackend,
    Layout,
    PinnedBackend,
    TierBackend,
)
from vramancer.memory.catalog import Catalog
from vramancer.memory.compression import AdaptiveCompression, CompressionManager
from vramancer.memory.eviction_index import EvictionIndex
from vramancer.memory.metrics import StoreMetrics
from vramancer.memory.records import BlockMeta
from vramancer.memory.recovery import Reconciled, reconcile
from vramancer.memory.settings import MemorySettings
from vramancer.memory.state import Entry, StoreState, Tier
from vramancer.memory.storage import DataDirLock
from vramancer.memory.tiers import CudaDevice, TierName, TierSpec, resolve_tiers

log = logging.getLogger("vramancer.memory.store")


def open_tiers(
    settings: MemorySettings,
    *,
    data_dir: Path,
    snapshot: SystemSnapshot,
    cuda: list[CudaDevice] | None,
    new_index: Callable[[float, str | None], EvictionIndex],
    compression: CompressionManager | None,
    metrics: StoreMetrics,
) -> list[Tier]:
    """The tiers present on this machine (``tiers.resolve_tiers``), built; ``compression``:
    the store's manager, else the default :class:`AdaptiveCompression`."""
    specs = resolve_tiers(settings, data_dir=data_dir, snapshot=snapshot, cuda=cuda)
    return build_tiers(
        specs,
        new_index=new_index,
        compression=compression or AdaptiveCompression(settings.compression),
        fsync=settings.fsync,
        metrics=metrics,
    )


def open_data_dir(
    state: StoreState, data_dir: Path, *, fsync: bool, now: float
) -> tuple[DataDirLock, Catalog, Reconciled]:
    """Lock the data directory, open the catalog and load the blocks it and the block files
    hold into ``state`` (its tiers set); the lock is released if that fails."""
    lock = DataDirLock.acquire(data_dir)
    try:
        catalog = Catalog(data_dir / "memory.sqlite", fsync=fsync)
        return lock, catalog, load_blocks(state, catalog, now)
    except BaseException:
        lock.release()
        raise


def build_tiers(
    specs: list[TierSpec],
    *,
    new_index: Callable[[float, str | None], EvictionIndex],
    compression: CompressionManager,
    fsync: bool,
    metrics: StoreMetrics,
) -> list[Tier]:
    """One :class:`Tier` per spec, fastest first (``StoreState.set_tiers`` links them)."""
    tiers: list[Tier] = []
    for position, spec in enumerate(specs):
        # A block evicted from this tier goes to (and is reloaded from) the next slower
        # one: its latency and learned reload cost rank this tier's victims. The slowest
        # tier evicts nothing; its own figures stand in.
        below = specs[position + 1] if position + 1 < len(specs) else spec
        index = new_index(below.latency, below.name.value)
        backend = backend_for(spec, compression, fsync=fsync)
        tier = Tier(spec, backend, index, target=spec.capacity_bytes, capacity=spec.capacity_bytes)
        tier.host = type(backend) is HostBackend
        tier.gauges = metrics.tier_gauges(tier.name)
        tiers.append(tier)
    return tiers


def backend_for(spec: TierSpec, manager: CompressionManager, *, fsync: bool) -> TierBackend:
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
        fsync=fsync,
    )


def load_blocks(state: StoreState, catalog: Catalog, now: float) -> Reconciled:
    """Reconcile the catalog with the block files (``recovery.reconcile``) and account the
    blocks on disk in ``state``."""
    dirs = {t.name: t.spec.path for t in state.tiers if t.is_disk and t.spec.path is not None}
    found = reconcile(catalog, dirs)
    for row in found.rows:
        tier = state.by_name[row.tier]
        assert tier.spec.path is not None
        layout = state.layouts.share(
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
        entry = Entry(meta, layout, FileHandle(path, row.codec, row.stored_size))
        state.blocks[row.id] = entry
        if row.durable:
            state.durable.add(row.id)
        state.account_in(tier, entry, now)
    for tier in state.tiers:
        tier.capacity = max(tier.target, tier.used)
    return found


def report_recovery(found: Reconciled, metrics: StoreMetrics, events: EventBus) -> None:
    """Log, count and publish what reconciliation quarantined, adopted and lost."""
    for item in found.quarantined:
        metrics.quarantined.labels(tier=item.tier or "none", what=item.what).inc()
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
        events.publish(ev.BlockLost(id=block_id, reason="file missing at start"))

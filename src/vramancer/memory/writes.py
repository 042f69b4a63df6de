"""A put, once checked: where the block goes (the placement's order, room made by the planner),
writing it there (its block file record and catalog row on L5/L6), and swapping it in for the
block it replaces, atomically for readers. Runs with the store's mover mutex held."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vramancer import event_types as ev
from vramancer.clock import Clock
from vramancer.errors import InsufficientMemory
from vramancer.events import EventBus
from vramancer.memory.backends import Layout
from vramancer.memory.catalog import Catalog
from vramancer.memory.checks import PutReceipt
from vramancer.memory.metrics import StoreMetrics
from vramancer.memory.mover import Mover
from vramancer.memory.placement import OrchestratorStrategy
from vramancer.memory.planning import Planning, tier_view
from vramancer.memory.records import BlockMeta
from vramancer.memory.settings import MemorySettings
from vramancer.memory.state import Entry, Free, StoreState, Tier
from vramancer.observability import tracing
from vramancer.units import format_size


class PutPolicy(Protocol):
    """What a put asks of the store's policy."""

    @property
    def placement(self) -> OrchestratorStrategy: ...

    def on_put(self, block: BlockMeta) -> None: ...


class Writer:
    """Places and writes new blocks. ``after_growth`` is told of the tier a put grew (the store
    runs or wakes its eviction cycle)."""

    def __init__(
        self,
        state: StoreState,
        moves: Mover,
        plan: Planning,
        *,
        policy: PutPolicy,
        db: Callable[[], Catalog],
        metrics: StoreMetrics,
        events: EventBus,
        clock: Clock,
        settings: MemorySettings,
        after_growth: Callable[[Tier], None],
    ) -> None:
        self._state = state
        self._moves = moves
        self._plan = plan
        self._policy = policy
        self._db = db
        self._metrics = metrics
        self._events = events
        self._clock = clock
        self._settings = settings
        self._after_growth = after_growth

    def put(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        priority: int,
        hint: str | None,
        *,
        durable: bool,
    ) -> PutReceipt:
        """Mover held: store the block (replacing one of the same id); ``InsufficientMemory``
        when no tier has room, ``InsufficientStorage`` on a full disk (nothing changed)."""
        state = self._state
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
        tier = self._place(meta, durable, now)
        meta.tier = tier.name
        entry = Entry(meta, state.layouts.share(layout), None)
        entry.handle = tier.backend.write(
            block_id,
            layout,
            value,
            owned=False,
            hint=hint,
            record=self._moves.record(entry, layout, durable) if tier.is_disk else None,
            durable=durable,
        )
        self._catalog_put(entry, tier, now, durable)
        frees: list[Free] = []
        with state.lock:
            old = state.blocks.get(block_id)
            old_tier = state.by_name[old.meta.tier] if old is not None else None
            if old is not None and old_tier is not None:
                frees = state.drop(old, old_tier)
            state.blocks[block_id] = entry
            if durable:
                state.durable.add(block_id)
            else:
                state.durable.discard(block_id)
            state.account_in(tier, entry, now)
        self._moves.free(frees)
        if old_tier is not None and old_tier is not tier:
            self._metrics.publish(old_tier)
        self._metrics.publish(tier)
        self._events.publish(ev.BlockPut(id=block_id, tier=tier.name, size=meta.size))
        self._after_growth(tier)
        return PutReceipt(tier.name, tier.is_disk and (durable or self._settings.fsync))

    def _place(self, meta: BlockMeta, durable: bool, now: float) -> Tier:
        """The tier a new block goes to (room made there), or ``InsufficientMemory``."""
        state = self._state
        with state.lock:
            self._policy.on_put(meta)
            views = [tier_view(t) for t in state.tiers]
        with tracing.span("orch.place_block", block_id=meta.id, size=meta.size) as span:
            order = self._policy.placement.place(meta, views, now)
            if durable:
                order = self._plan.disk_order(order, meta.size)
            tier = self._plan.room_for_new(meta, order)
            if span is not None:
                span.set_attribute("tier", tier.name if tier else "none")
        if tier is None:
            with state.lock:
                available = max((t.free for t in state.tiers), default=0)
            raise InsufficientMemory(
                f"no tier has room for a block of {format_size(meta.size)}",
                requested_bytes=meta.size,
                available_bytes=available,
            )
        return tier

    def _catalog_put(self, entry: Entry, tier: Tier, now: float, durable: bool) -> None:
        """The new copy's catalog row (or the old row gone, for a block leaving the disk
        tiers); the new copy is freed if the catalog fails."""
        block_id = entry.meta.id
        with self._state.lock:
            old = self._state.blocks.get(block_id)
        try:
            if tier.is_disk:
                self._db().upsert(
                    self._moves.row(entry, now, tier, durable=durable), force_sync=durable
                )
            elif old is not None and self._state.by_name[old.meta.tier].is_disk:
                self._db().delete(block_id)
        except BaseException:
            tier.backend.free(entry.handle)
            raise

"""The tiered store's Prometheus instruments and move totals (``stats()``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vramancer import event_types as ev
from vramancer.observability.metrics import Metrics

#: The event each kind of move publishes.
MoveEvent = type[ev.BlockPromoted] | type[ev.BlockDemoted] | type[ev.BlockEvicted]

if TYPE_CHECKING:
    from vramancer.memory.state import Tier

#: Reasons of downward moves that count as evictions (the rest are demotions on request).
EVICT_REASONS = frozenset({"evict", "pressure", "capacity", "room"})


@dataclass(frozen=True, slots=True)
class Moved:
    """A finished move, reported after the locks are released."""

    block_id: str
    size: int
    source: str
    target: str
    reason: str
    seconds: float
    upward: bool

    @property
    def eviction(self) -> bool:
        return not self.upward and self.reason in EVICT_REASONS


class StoreMetrics:
    """Per-tier gauges, move counters, quarantine counter; totals of moves for ``stats()``
    (updated under the store's metadata lock)."""

    def __init__(self, metrics: Metrics) -> None:
        m = metrics
        self.used = m.gauge(
            "vramancer_memory_tier_used_bytes", "Bytes of blocks held in each tier.", ["tier"]
        )
        self.capacity = m.gauge(
            "vramancer_memory_tier_capacity_bytes", "Effective capacity of each tier.", ["tier"]
        )
        self.blocks = m.gauge("vramancer_memory_blocks", "Blocks held in each tier.", ["tier"])
        self.ratio = m.gauge(
            "vramancer_memory_compression_ratio",
            "Raw bytes over stored bytes of the blocks in each tier (1: uncompressed).",
            ["tier"],
        )
        self.promotions = m.counter(
            "vramancer_memory_promotions_total", "Blocks moved up, by destination tier.", ["tier"]
        )
        self.demotions = m.counter(
            "vramancer_memory_demotions_total", "Blocks moved down, by destination tier.", ["tier"]
        )
        self.evictions = m.counter(
            "vramancer_memory_evictions_total",
            "Blocks pushed out of a tier by pressure or a smaller budget, by source tier.",
            ["tier"],
        )
        self.quarantined = m.counter(
            "vramancer_memory_quarantined_blocks_total",
            "Block files moved into <tier dir>/quarantine/ and catalog rows moved into the "
            "catalog's quarantine table, because they could not be read or accounted for.",
            ["tier", "what"],
        )
        self.moved = m.counter(
            "vramancer_memory_bytes_moved_total",
            "Bytes moved between tiers, by destination.",
            ["tier"],
        )
        self.totals = dict.fromkeys(("promotions", "demotions", "evictions", "bytes_moved"), 0)
        #: Bytes moved down by evictions (``evict`` answers the difference).
        self.evicted_bytes = 0

    def tier_gauges(self, tier: str) -> tuple[Any, ...]:
        """The children of the per-tier gauges for ``tier`` (used, capacity, blocks, ratio)."""
        return tuple(
            g.labels(tier=tier) for g in (self.used, self.capacity, self.blocks, self.ratio)
        )

    def publish(self, tier: Tier) -> None:
        used, capacity, blocks, ratio = tier.gauges
        used.set(tier.used)
        capacity.set(tier.capacity)
        blocks.set(tier.blocks)
        ratio.set(tier.used / tier.stored if tier.stored else 1.0)

    def count(self, size: int, upward: bool, reason: str) -> None:
        """Metadata lock held: a move's totals."""
        totals = self.totals
        totals["promotions" if upward else "demotions"] += 1
        totals["bytes_moved"] += size
        if not upward and reason in EVICT_REASONS:
            totals["evictions"] += 1
            self.evicted_bytes += size

    def observe(self, move: Moved) -> MoveEvent:
        """A move's counters (after the locks); returns the class of its event."""
        event: MoveEvent
        if move.upward:
            self.promotions.labels(tier=move.target).inc()
            event = ev.BlockPromoted
        elif move.eviction:
            self.demotions.labels(tier=move.target).inc()
            self.evictions.labels(tier=move.source).inc()
            event = ev.BlockEvicted
        else:
            self.demotions.labels(tier=move.target).inc()
            event = ev.BlockDemoted
        self.moved.labels(tier=move.target).inc(move.size)
        return event

    def evictions_so_far(self) -> tuple[int, int]:
        """(blocks evicted, bytes evicted) so far."""
        return self.totals["evictions"], self.evicted_bytes

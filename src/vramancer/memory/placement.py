"""Initial placement: which tiers a new block should try, fastest acceptable first.

:class:`HotnessPlacement` (the default) learns, per hint, how often a written block is read
again, and starts a rarely re-read block below a tier under pressure; :class:`FastestFirstStrategy`
is the simplest strategy. ``memory.placement_strategy`` names another (``plugins.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from vramancer.memory.records import BlockMeta, TierView

#: Placement: decay per put of a hint's counts of puts and first reads, and the most hints kept.
HINT_ALPHA = 0.05
MAX_HINTS = 1024
#: Placement: a block whose hint is re-read less often than this starts below the fastest tier
#: when that tier is under pressure.
COLD_HINT_REREAD_RATE = 0.05
#: Placement: fraction of observations before a hint's learned rate is trusted.
HINT_MIN_OBSERVATIONS = 32


class OrchestratorStrategy(Protocol):
    """Initial placement: ``place(block, tiers, now)``.

    Returns the preferred tier names, fastest acceptable first; the store takes the first that
    has room (after eviction if allowed). An empty sequence means "no room" — a value.
    """

    def place(self, block: BlockMeta, tiers: Sequence[TierView], now: float) -> Sequence[str]: ...


class FastestFirstStrategy:
    """Simplest placement: every tier that can hold the block, fastest first."""

    def place(self, block: BlockMeta, tiers: Sequence[TierView], now: float) -> Sequence[str]:
        return [
            t.name for t in sorted(tiers, key=lambda t: t.latency) if t.capacity_bytes >= block.size
        ]


class HotnessPlacement:
    """Default initial placement by size, predicted hotness, tier pressure and priority.

    * Tiers too small for the block are skipped; the rest are ordered fastest first.
    * Predicted hotness: per hint, the learned share of written blocks that are read again
      (exponentially decayed counts of puts and first reads, fed by :meth:`observe_put` and
      :meth:`observe_first_read`). A block whose hint is
      rarely re-read, with no priority, does not push others out of a tier under pressure: it
      starts in the fastest tier that is not under pressure (or the slowest, if all are).
    * A block with priority above zero, or an unknown hint, keeps the fastest-first order.
    """

    def __init__(self, pressure_high: float = 0.9) -> None:
        self.pressure_high = pressure_high
        #: hint -> [decayed puts, decayed first reads, puts seen]
        self._hints: OrderedDict[str | None, list[float]] = OrderedDict()

    def predicted_reread(self, hint: str | None) -> float | None:
        """Learned share of blocks with ``hint`` read again after being written (None: unknown)."""
        stats = self._hints.get(hint)
        if stats is None or stats[2] < HINT_MIN_OBSERVATIONS:
            return None
        return min(1.0, stats[1] / stats[0]) if stats[0] > 0 else 0.0

    def observe_put(self, block: BlockMeta) -> None:
        """A block was written: both decayed counts age by one step, puts gain one."""
        hint = block.hint
        stats = self._hints.get(hint)
        if stats is None:
            stats = [0.0, 0.0, 0.0]
            self._hints[hint] = stats
            if len(self._hints) > MAX_HINTS:
                self._hints.popitem(last=False)
        else:
            self._hints.move_to_end(hint)
        keep = 1.0 - HINT_ALPHA
        stats[0] = stats[0] * keep + 1.0
        stats[1] *= keep
        stats[2] += 1.0

    def observe_first_read(self, block: BlockMeta) -> None:
        """A block is read for the first time: its hint's first reads gain one."""
        stats = self._hints.get(block.hint)
        if stats is not None:
            stats[1] += 1.0

    def place(self, block: BlockMeta, tiers: Sequence[TierView], now: float) -> Sequence[str]:
        fitting = sorted(
            (t for t in tiers if t.capacity_bytes >= block.size), key=lambda t: t.latency
        )
        if not fitting:
            return []
        rate = self.predicted_reread(block.hint)
        if block.priority > 0 or rate is None or rate >= COLD_HINT_REREAD_RATE:
            return [t.name for t in fitting]
        relaxed = [
            t
            for t in fitting
            if t.pressure < (t.pressure_high or self.pressure_high) and t.free_bytes >= block.size
        ]
        start = relaxed[0] if relaxed else fitting[-1]
        return [t.name for t in fitting if t.latency >= start.latency]

"""Extensions loaded by dotted path in the plugin tests (``memory/plugins.py``)."""

from __future__ import annotations

from collections.abc import Sequence

from vramancer.memory.policy import BlockMeta, TierView


class SlowestFirst:
    """A placement strategy with only the documented method: the slowest tier first."""

    def place(self, block: BlockMeta, tiers: Sequence[TierView], now: float) -> Sequence[str]:
        fitting = [t for t in tiers if t.capacity_bytes >= block.size]
        return [t.name for t in sorted(fitting, key=lambda t: -t.latency)]


class CountingHotness:
    """A hotness model: the number of hits, never decayed."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}

    def record_hit(self, block: BlockMeta, now: float) -> None:
        self.hits[block.id] = self.hits.get(block.id, 0) + 1

    def score(self, block: BlockMeta, now: float) -> float:
        return float(self.hits.get(block.id, 0))


def make_strategy() -> SlowestFirst:
    """A factory: the loader calls it."""
    return SlowestFirst()


#: An instance: the loader uses it as it is.
STRATEGY = SlowestFirst()
NOT_A_STRATEGY = 42

"""Promotion: when a block read in a slower tier moves up, and how much an eviction cycle frees
(:func:`bytes_to_free`, the watermark rule the planner uses too)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramancer.memory.hotness import HotnessModel
from vramancer.memory.records import BlockMeta, TierView

if TYPE_CHECKING:
    from vramancer.memory.policy import PolicyConfig

#: A block read from a slower tier is promoted when its hotness is at least this.
DEFAULT_PROMOTE_THRESHOLD = 1.0


class PromotionPolicy:
    """When a block read in a slower tier moves up, and how much an eviction cycle frees.

    Demotion has no threshold of its own: the eviction cycle demotes under pressure, in the
    eviction index's order, and ``compress_cold`` moves L4 blocks at or under
    ``memory.cold_threshold`` to disk."""

    def __init__(self, hotness: HotnessModel, config: PolicyConfig) -> None:
        self._hotness = hotness
        self.config = config

    def should_promote(
        self, block: BlockMeta, from_tier: TierView | str, to_tier: TierView, now: float
    ) -> bool:
        """Whether a block just read in ``from_tier`` should move up to ``to_tier``.

        Pinned blocks never move. A block hotter than the threshold goes up; so does any block
        that fits in the target without taking it past its high watermark (moving into free
        space displaces nobody; past the mark the eviction cycle would push others out).
        """
        if block.pinned or block.size > to_tier.capacity_bytes:
            return False
        high = to_tier.pressure_high or self.config.pressure_high
        if to_tier.used_bytes + block.size <= high * to_tier.capacity_bytes:
            return True
        return self._hotness.score(block, now) >= self.config.promote_threshold

    def bytes_to_free(self, tier: TierView, incoming_bytes: int = 0) -> int:
        """Bytes an eviction cycle must free (see :func:`bytes_to_free`), with the configured
        watermarks."""
        return bytes_to_free(
            tier.used_bytes,
            tier.capacity_bytes,
            incoming_bytes,
            tier.pressure_high or self.config.pressure_high,
            tier.pressure_low if tier.pressure_low is not None else self.config.pressure_low,
        )


def bytes_to_free(
    used_bytes: int,
    capacity_bytes: int,
    incoming_bytes: int,
    pressure_high: float,
    pressure_low: float,
    *,
    force: bool = False,
) -> int:
    """Bytes to demote from a tier: always enough for ``incoming_bytes`` to fit, and down to
    ``pressure_low × capacity`` once the tier (with the incoming bytes) passes
    ``pressure_high × capacity`` — or, with ``force``, in any case. The store calls it with
    each tier's own watermarks."""
    used = used_bytes + incoming_bytes
    need = max(0, used - capacity_bytes)
    if capacity_bytes and (force or used > pressure_high * capacity_bytes):
        need = max(need, used - int(pressure_low * capacity_bytes))
    return need

"""Learned ranking decay: where it starts, which ghosts vote which way, how far one vote goes.

The index is driven through the calls the store makes (add, victims, remove, touch); the counts
are set by hand so that each case is exact.
"""

from __future__ import annotations

from vramancer.memory.policy import BlockMeta, DecayedHotness, HotnessIndex
from vramancer.memory.ranking import GHOST_RATIO_MAX


def block(block_id: str, hits: float = 0.0, now: float = 0.0) -> BlockMeta:
    return BlockMeta(id=block_id, size=1, tier="L4", hits=hits, created=now, last_access=now)


def incumbents(count: int = 64, hits: float = 8.0) -> HotnessIndex:
    """An index of ``count`` unit blocks read ``hits`` times each, all in main but the last."""
    index = HotnessIndex(DecayedHotness(60.0))
    for i in range(count):
        index.add(block(f"b{i}", hits), 0.0)
    return index


def reject_newcomer(index: HotnessIndex, hits: float) -> BlockMeta:
    """A block read ``hits`` times enters and leaves the window against the incumbents."""
    newcomer = block("new", hits, now=1.0)
    index.add(newcomer, 1.0)
    index.add(block("next", 8.0, now=1.0), 1.0)  # pushes the newcomer out of the window
    assert index.segment_of(newcomer) == "main"
    return newcomer


def evict_and_return(index: HotnessIndex, expected: BlockMeta, now: float) -> None:
    (victim,) = index.victims(1, now)
    assert victim is expected
    index.remove(victim)
    index.add(victim, now + 1.0)


def test_the_ranking_starts_a_little_on_the_recency_side_of_the_half_life() -> None:
    index = HotnessIndex(DecayedHotness(60.0))
    assert index.recency_weight == 7 / 16
    assert index.ranking_half_life_s == 30.0


def test_a_block_rejected_by_the_duel_comes_back_as_a_seen_once_ghost() -> None:
    # Read twice, it loses the duel against blocks read 8 times and is the next victim; its
    # return says an LRU would have kept it: towards recency, like a block seen once.
    index = incumbents()
    start = index.recency_weight
    newcomer = reject_newcomer(index, hits=2.0)
    evict_and_return(index, newcomer, 2.0)
    assert index.recency_weight > start


def test_a_rejected_block_hit_before_its_eviction_comes_back_as_a_seen_more_ghost() -> None:
    index = incumbents()
    start = index.recency_weight
    newcomer = reject_newcomer(index, hits=2.0)
    index.touch(newcomer, 1.5)  # a hit in main: it had its place among the frequent blocks
    evict_and_return(index, newcomer, 2.0)
    assert index.recency_weight < start


def test_a_rejected_block_with_a_high_count_still_comes_back_as_seen_more() -> None:
    index = incumbents(hits=16.0)
    start = index.recency_weight
    newcomer = reject_newcomer(index, hits=4.0)
    evict_and_return(index, newcomer, 2.0)
    assert index.recency_weight < start


def test_one_ghost_hit_moves_the_weight_by_at_most_the_capped_list_ratio() -> None:
    # x = 0 (weight 6/16, under the gain zone): ARC's step is ratio / 64 per ghost hit.
    index = HotnessIndex(DecayedHotness(60.0), recency_factor=1.0)
    for i in range(64):
        index.add(block(f"b{i}"), 0.0)
    for _ in range(20):  # twenty blocks never read: twenty seen-once ghosts
        (victim,) = index.victims(1, 1.0)
        index.remove(victim)
    (victim,) = index.victims(1, 1.0)
    victim.hits = 4.0  # one seen-more ghost
    index.remove(victim)
    index.add(victim, 2.0)
    # ARC's factor would be 20 / 1; capped, the weight moves GHOST_RATIO_MAX / 64.
    assert GHOST_RATIO_MAX < 20
    assert index.recency_weight == 0.375 - GHOST_RATIO_MAX / 64

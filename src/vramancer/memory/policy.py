"""Pure memory policies: hotness, placement, eviction order, promotion, prefetch.

INTERFACE SKELETON — the default implementations here are deliberately simple and are replaced
by the policy work of issue 3. The store (``memory/store.py``) and the policy benchmark
(``bench/memory/policy.py``) both drive these same objects, so keep the signatures.

No I/O, no locks, no clock reads: ``now`` (monotonic seconds) is always passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True, eq=False)
class BlockMeta:
    """Metadata of one block, owned and mutated by the store under its lock (data is elsewhere)."""

    id: str
    size: int
    tier: str
    priority: int = 0
    pinned: bool = False
    hint: str | None = None
    #: Decayed hit count (LFU part), valid at ``last_access``.
    hits: float = 0.0
    #: Monotonic time of the last access (LRU part).
    last_access: float = 0.0
    created: float = 0.0
    #: Codec of the stored bytes on L5/L6 (``none``, ``zstd``, ...).
    compression: str = "none"
    #: Readers currently holding the block; a block being read is never freed.
    readers: int = 0
    #: Opaque slot for the eviction index (heap entry, bucket ...).
    index_slot: object | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class TierView:
    """What placement needs to know about a tier, frozen at decision time."""

    name: str
    latency: float
    capacity_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def pressure(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 1.0


class HotnessModel(Protocol):
    """Scores how hot a block is (seed 000 ``HotnessModel.score(block)``)."""

    def record_hit(self, block: BlockMeta, now: float) -> None: ...

    def score(self, block: BlockMeta, now: float) -> float: ...


class OrchestratorStrategy(Protocol):
    """Initial placement (seed 000 ``OrchestratorStrategy.place(block)``).

    Returns the preferred tier names, fastest acceptable first; the store takes the first that
    has room (after eviction if allowed). An empty sequence means "no room" — a value.
    """

    def place(self, block: BlockMeta, tiers: Sequence[TierView], now: float) -> Sequence[str]: ...


class EvictionIndex(Protocol):
    """Per-tier incremental structure ordering blocks for eviction.

    Score: ``(coldness × size) / (reload_cost + priority)``; highest goes first. Pinned blocks
    and blocks with readers are never returned.
    """

    def add(self, block: BlockMeta, now: float) -> None: ...

    def remove(self, block: BlockMeta) -> None: ...

    def touch(self, block: BlockMeta, now: float) -> None: ...

    def victims(self, need_bytes: int, now: float) -> list[BlockMeta]:
        """Blocks whose removal frees at least ``need_bytes`` (fewer if not possible)."""
        ...

    def __len__(self) -> int: ...


class Prefetcher(Protocol):
    """Learns access sequences (block k then k+1) and names blocks worth promoting ahead."""

    def observe(self, block_id: str, now: float) -> Sequence[str]: ...


class DecayedHotness:
    """Decayed hit count with half-life ``half_life_s``: each hit adds 1, the total halves every
    half-life. Recency is part of it, since old hits have decayed."""

    def __init__(self, half_life_s: float = 60.0) -> None:
        self.half_life_s = half_life_s

    def decayed(self, block: BlockMeta, now: float) -> float:
        age = max(0.0, now - block.last_access)
        return float(block.hits * 0.5 ** (age / self.half_life_s))

    def record_hit(self, block: BlockMeta, now: float) -> None:
        block.hits = self.decayed(block, now) + 1.0
        block.last_access = now

    def score(self, block: BlockMeta, now: float) -> float:
        return self.decayed(block, now)


class FastestFirstStrategy:
    """Simplest placement: the fastest tier first (replaced by the issue-3 policy)."""

    def place(self, block: BlockMeta, tiers: Sequence[TierView], now: float) -> Sequence[str]:
        return [t.name for t in sorted(tiers, key=lambda t: t.latency)]


class LruIndex:
    """Simplest eviction index: least recently used first (replaced by the issue-3 policy)."""

    def __init__(self) -> None:
        self._blocks: dict[str, BlockMeta] = {}

    def add(self, block: BlockMeta, now: float) -> None:
        self._blocks[block.id] = block

    def remove(self, block: BlockMeta) -> None:
        self._blocks.pop(block.id, None)

    def touch(self, block: BlockMeta, now: float) -> None:
        self._blocks.pop(block.id, None)
        self._blocks[block.id] = block

    def victims(self, need_bytes: int, now: float) -> list[BlockMeta]:
        chosen: list[BlockMeta] = []
        freed = 0
        for block in self._blocks.values():
            if freed >= need_bytes:
                break
            if block.pinned or block.readers:
                continue
            chosen.append(block)
            freed += block.size
        return chosen

    def __len__(self) -> int:
        return len(self._blocks)


class NoPrefetch:
    def observe(self, block_id: str, now: float) -> Sequence[str]:
        return ()


def total_size(blocks: Iterable[BlockMeta]) -> int:
    return sum(b.size for b in blocks)

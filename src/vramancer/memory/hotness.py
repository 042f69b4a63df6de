"""Hotness: a block's hit count decayed with a half-life (LFU and LRU at once).

A block's hotness is its hit count decayed with a half-life (60 s by default): recent hits
weigh more, old ones fade. Because every count decays at the same rate, the order of decayed
counts never changes with time, so :meth:`DecayedHotness.log_key` (log2 of the count referred to
a fixed epoch) orders blocks at every instant: that is what lets the eviction heap
(``eviction_index.py``) stay valid without re-scoring.
"""

from __future__ import annotations

import math
from typing import Protocol

from vramancer.errors import InvalidInput
from vramancer.memory.records import BlockMeta

#: Half-life of the decayed hit count, seconds (``memory.half_life_s``).
DEFAULT_HALF_LIFE_S = 60.0
#: log2 hotness given to a block that was never read (written or prefetched only): colder than
#: any block read in the last 30 half-lives.
NEVER_READ_LOG2 = -30.0


class HotnessModel(Protocol):
    """Scores how hot a block is (``score``); told every hit (``record_hit``). The default is
    :class:`DecayedHotness`; ``memory.hotness_model`` names another (``plugins.py``)."""

    def record_hit(self, block: BlockMeta, now: float) -> None: ...

    def score(self, block: BlockMeta, now: float) -> float: ...


class DecayedHotness:
    """Decayed hit count with half-life ``half_life_s``: each hit adds 1, the total halves every
    half-life. Recency is part of it, since old hits have decayed.

    Because all counts decay at the same rate, ``log_key`` (log2 of the count referred to the
    epoch ``t = 0``) orders blocks exactly as their decayed counts do, at every instant: that is
    what lets the eviction heap stay valid without re-scoring.
    """

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        if not half_life_s > 0:
            raise InvalidInput("half_life_s must be positive", field="half_life_s")
        self.half_life_s = half_life_s
        self._inv_half_life = 1.0 / half_life_s

    def decayed(self, block: BlockMeta, now: float) -> float:
        if block.hits <= 0.0:
            return 0.0
        age = max(0.0, now - block.last_access)
        return float(block.hits * 0.5 ** (age * self._inv_half_life))

    def record_hit(self, block: BlockMeta, now: float) -> None:
        # decayed() inlined: this runs on every read
        hits = block.hits
        last = block.last_access
        if hits > 0.0 and now > last:
            hits *= 0.5 ** ((now - last) * self._inv_half_life)
        block.hits = (hits if hits > 0.0 else 0.0) + 1.0
        if now > last:
            block.last_access = now

    def score(self, block: BlockMeta, now: float) -> float:
        return self.decayed(block, now)

    def history(self, block: BlockMeta, now: float) -> float:
        """Decayed hits before the latest one: what a block earned before its current visit."""
        if block.hits <= 1.0:
            return 0.0
        age = max(0.0, now - block.last_access)
        return float((block.hits - 1.0) * 0.5 ** (age * self._inv_half_life))

    def log_key(self, block: BlockMeta, inv_half_life: float | None = None) -> float:
        """Time-invariant log2 hotness: ``log2(decayed(now)) + now / half_life`` for any now.

        ``inv_half_life`` (1 / seconds) ranks by the count at the last access decayed from then
        at another rate (LRFU's knob: fast decay → LRU order, slow decay → LFU order).
        """
        inv = self._inv_half_life if inv_half_life is None else inv_half_life
        stamp = block.last_access if block.last_access > block.created else block.created
        if block.hits <= 0.0:
            return NEVER_READ_LOG2 + stamp * inv
        return math.log2(block.hits) + stamp * inv

    def history_log_key(
        self, block: BlockMeta, inv_half_life: float | None = None, discount: float = 1.0
    ) -> float:
        """``log_key`` of the count less ``discount`` of the latest hit (1: :meth:`history`);
        nothing left counts as never read."""
        inv = self._inv_half_life if inv_half_life is None else inv_half_life
        left = block.hits - discount
        if left <= 0.0 or block.hits <= 0.0:
            stamp = block.last_access if block.last_access > block.created else block.created
            return NEVER_READ_LOG2 + stamp * inv
        return math.log2(left) + block.last_access * inv

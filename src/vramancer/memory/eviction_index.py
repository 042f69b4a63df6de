"""The eviction index: per tier, the blocks in the order they should leave it.

:class:`HotnessIndex` (the default) keeps a small recency *window* in front of a *main* region,
a heap ordered by ``(coldness × size) / (reload_cost + priority)`` under a time-invariant key
(``hotness.py``), so it is never re-scored; a hit only marks a block's entry dirty, and the entry
takes the block's current value when it reaches the top (lazy re-key). Which blocks leave the
window for main is the admission duel (``admission.py``); how fast the ranking forgets is
learned from ghost hits (``ranking.py``); the reload cost is ``reload_cost.py``'s.
:class:`LruIndex` is the baseline.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from vramancer.memory.admission import DEFAULT_WINDOW_FRACTION, admitted_key
from vramancer.memory.hotness import DecayedHotness
from vramancer.memory.ranking import DEFAULT_RECENCY_FACTOR, AdaptiveRanking
from vramancer.memory.records import BlockMeta
from vramancer.memory.reload_cost import ReloadCostModel

#: Most share of an index's bytes held by prefetched blocks waiting for their read.
PREFETCH_SHARE = 0.1
#: Latency of the tier a block is reloaded from when the index is not told (an L5-like SSD).
DEFAULT_RELOAD_LATENCY = 16.0
#: Dead heap entries tolerated before the heap is rebuilt (and at least this share of live ones).
COMPACT_MIN_DEAD = 1024


class EvictionIndex(Protocol):
    """Per-tier incremental structure ordering blocks for eviction.

    Score: ``(coldness × size) / (reload_cost + priority)``; highest goes first. Pinned blocks
    and blocks with readers are never returned.
    """

    def add(self, block: BlockMeta, now: float, *, prefetched: bool = False) -> None:
        """A block entered the tier; ``prefetched``: promoted ahead of its read."""
        ...

    def remove(self, block: BlockMeta) -> None: ...

    def touch(self, block: BlockMeta, now: float) -> None: ...

    def victims(self, need_bytes: int, now: float) -> list[BlockMeta]:
        """Blocks whose removal frees at least ``need_bytes`` (fewer if not possible)."""
        ...

    def __len__(self) -> int: ...


_Entry = tuple[float, BlockMeta]


class _Segment:
    """``index_slot`` marker of a block in an ordered segment (window, outgoing) of one index."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class HotnessIndex:
    """Default per-tier eviction index: recency window + time-invariant value heap.

    Two segments:

    * **window** — the most recently added or hit blocks, in LRU order, holding
      ``window_fraction`` of the index's bytes (at least one block);
    * **main** — a min-heap of ``(key, block)`` where the key is the time-invariant log2 of
      ``hotness × (reload_cost + priority) / size``: the lowest key is the highest
      ``(coldness × size) / (reload_cost + priority)``. A hit re-keys a block by pushing a new
      entry; the old one dies lazily (an entry is live iff ``block.index_slot is entry``), and
      the heap is rebuilt when dead entries outnumber live ones.

    A block leaving the window enters main keyed by its *history* — its hits before the latest
    one, which the window has already rewarded — and takes a place among the incumbents only if
    it wins the admission duel (``admission.py``); otherwise it goes below every block. So a
    block seen once (a scan, a loop that does not fit) is the next to go, while a block that
    keeps coming back climbs.

    The ranking decays counts with its own half-life ``half_life × 2^x``; with ``adaptive``,
    ``x`` is learned from ghost hits (``ranking.py``). A change of ``x`` by ``RERANK_STEP``
    rebuilds the heap in O(n) (keys shift by ``stamp × Δ(1/half-life)``).

    ``victims`` never changes membership (the store calls ``remove`` for the blocks it really
    moves; a ``remove`` of a block the last ``victims`` returned counts as an eviction) and
    never returns pinned blocks or blocks with readers.
    """

    def __init__(
        self,
        hotness: DecayedHotness,
        *,
        reload_latency: float = DEFAULT_RELOAD_LATENCY,
        reload_tier: str | None = None,
        costs: ReloadCostModel | None = None,
        window_fraction: float = DEFAULT_WINDOW_FRACTION,
        adaptive: bool = True,
        recency_factor: float = DEFAULT_RECENCY_FACTOR,
    ) -> None:
        self._hotness = hotness
        self._costs = costs if costs is not None else ReloadCostModel()
        self._reload_latency = reload_latency
        self._reload_tier = reload_tier
        self._in_window = _Segment("window")
        self._in_ahead = _Segment("ahead")
        #: ``index_slot`` of a block in main hit since its heap entry was made (see ``touch``).
        self._in_main_dirty = _Segment("main")
        self._heap: list[_Entry] = []
        #: Blocks in main (each has one live entry in the heap, clean or dirty).
        self._main = 0
        self._window: OrderedDict[str, BlockMeta] = OrderedDict()
        self._window_bytes = 0
        #: Prefetched blocks not read yet, oldest first (see ``add``).
        self._ahead: OrderedDict[str, BlockMeta] = OrderedDict()
        self._ahead_bytes = 0
        self._bytes = 0
        self._count = 0
        self.window_fraction = window_fraction
        self.adaptive = adaptive
        self._ranking = AdaptiveRanking(hotness.half_life_s, recency_factor)
        #: 1 / the ranking half-life the heap's keys are computed with (the ranking's, as of
        #: the last re-rank).
        self._inv_recency = self._ranking.inv_recency
        #: Ids returned by the last ``victims`` call: a ``remove`` of one of them is an eviction.
        self._pending: set[str] = set()

    # -- bookkeeping -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, block: object) -> bool:
        return isinstance(block, BlockMeta) and self.segment_of(block) is not None

    @property
    def bytes(self) -> int:
        """Bytes of the blocks in the index."""
        return self._bytes

    @property
    def window_bytes(self) -> int:
        return self._window_bytes

    @property
    def heap_entries(self) -> int:
        """Entries in main's heap, live and dead (for audits and tests: a hit adds none)."""
        return len(self._heap)

    def segment_of(self, block: BlockMeta) -> str | None:
        """``window``, ``main``, ``ahead`` (prefetched, not read yet) or ``None`` (not here)."""
        slot = block.index_slot
        if slot is self._in_window:
            return "window"
        if slot is self._in_ahead:
            return "ahead"
        if slot is self._in_main_dirty:
            return "main"
        # A heap entry in index_slot means "live in the index that made it": the store removes
        # a block from one tier's index before adding it to another's.
        if type(slot) is tuple and slot[1] is block:
            return "main"
        return None

    def value_log(self, block: BlockMeta) -> float:
        """Time-invariant log2 of ``hotness × (reload_cost + priority) / size`` (low = evict)."""
        return self._hotness.log_key(block, self._inv_recency) + self._cost_log(block)

    def _cost_log(self, block: BlockMeta) -> float:
        size = block.size if block.size > 0 else 1
        cost = self._costs.cost(size, self._reload_latency, self._reload_tier)
        return math.log2(cost + max(0, block.priority)) - math.log2(size)

    def _push(self, block: BlockMeta, key: float) -> None:
        entry: _Entry = (key, block)
        block.index_slot = entry
        heapq.heappush(self._heap, entry)

    def _rekey(self, block: BlockMeta) -> None:
        """A dirty block's entry reached the top (or a rebuild): give it its current value."""
        self._push(block, self.value_log(block))

    def _maybe_compact(self) -> None:
        """Rebuild the heap when dead entries (of removed blocks) outnumber live ones."""
        dead = len(self._heap) - self._main
        if dead > COMPACT_MIN_DEAD and dead > self._main:
            self._rebuild(0.0)

    def _rebuild(self, delta: float) -> None:
        """A fresh heap of the live entries: clean keys shifted by ``stamp × delta`` (a new
        ranking decay, see ``_rerank``), dirty blocks re-keyed, dead entries dropped. O(n)."""
        heap: list[_Entry] = []
        dirty = self._in_main_dirty
        for entry in self._heap:
            block = entry[1]
            slot = block.index_slot
            if slot is entry:
                if delta:
                    stamp = max(block.last_access, block.created)
                    entry = (entry[0] + stamp * delta, block)
                    block.index_slot = entry
                heap.append(entry)
            elif slot is dirty:
                fresh: _Entry = (self.value_log(block), block)
                block.index_slot = fresh
                heap.append(fresh)
        heapq.heapify(heap)
        self._heap = heap

    @property
    def ranking_half_life_s(self) -> float:
        """Half-life with which the eviction ranking decays counts (adapted when adaptive)."""
        return 1.0 / self._inv_recency

    @property
    def recency_weight(self) -> float:
        """The learned recency weight in [0, 1] (``ranking.py``): 0 ranks by frequency, 1 by
        recency."""
        return self._ranking.recency_weight

    def _ghost_hit(self, block: BlockMeta) -> None:
        """A block comes back after an eviction: the ranking learns which way to lean
        (``AdaptiveRanking.ghost_hit``) and the heap follows when its decay changed."""
        inv_recency = self._ranking.ghost_hit(block.id, self._count)
        if inv_recency is not None:
            self._rerank(inv_recency)

    def _rerank(self, inv_recency: float) -> None:
        """Change the ranking decay: every key's recency term moves, so the heap is rebuilt.

        O(n), at most once per ``RERANK_STEP`` of the learned ``x``.
        """
        delta = inv_recency - self._inv_recency
        self._inv_recency = inv_recency
        self._rebuild(delta)

    # -- protocol ----------------------------------------------------------------------------

    def add(self, block: BlockMeta, now: float, *, prefetched: bool = False) -> None:
        """Index a block that just entered the tier (most recent end of the window).

        ``prefetched=True`` (a promotion ahead of the reader, not a read): the block waits in
        the *ahead* segment, which is evicted only after main and the window, until its read
        comes (``touch`` moves it to the window). The segment holds at most
        ``PREFETCH_SHARE`` of the bytes; its oldest blocks beyond that join main with their own
        value, so a prediction that does not come true cools like any block.
        """
        if self.segment_of(block) is not None:
            self.touch(block, now)
            return
        self._bytes += block.size
        self._count += 1
        if prefetched:
            self._ahead[block.id] = block
            block.index_slot = self._in_ahead
            self._ahead_bytes += block.size
            budget = PREFETCH_SHARE * self._bytes
            ahead = self._ahead
            while self._ahead_bytes > budget and len(ahead) > 1:
                _, old = ahead.popitem(last=False)
                self._ahead_bytes -= old.size
                self._main += 1
                self._push(old, self.value_log(old))
            return
        self._window[block.id] = block
        block.index_slot = self._in_window
        self._window_bytes += block.size
        if self.adaptive:
            self._ghost_hit(block)
        self._drain_window()

    def remove(self, block: BlockMeta) -> None:
        """Forget a block (moved away or deleted); unknown blocks are ignored."""
        segment = self.segment_of(block)
        if segment is None:
            return
        if segment == "window":
            del self._window[block.id]
            self._window_bytes -= block.size
        elif segment == "ahead":
            del self._ahead[block.id]
            self._ahead_bytes -= block.size
        else:
            self._main -= 1
        block.index_slot = None
        self._bytes -= block.size
        self._count -= 1
        if block.id in self._pending:
            self._pending.discard(block.id)
            if self.adaptive:
                self._ranking.remember_eviction(block, self._count)
        elif segment == "main":
            self._ranking.forget_rejection(block.id)
        self._maybe_compact()

    def touch(self, block: BlockMeta, now: float) -> None:
        """A hit (after ``record_hit``), or a changed priority/pin: re-order the block.

        O(1) for a block in main: it is only marked *dirty* (its heap entry stays where it
        is); the entry gets the block's current value when it comes to the top of the heap
        (``victims``, ``coldest``) or at a rebuild. A hit raises a block's value whenever the
        ranking decays at least as fast as the hotness (``x ≤ 0``), so its old entry comes up
        no later than the new one would: the order of victims is the same as with an eager
        re-key. (With ``x > 0`` a block hit after a long idle time may be valued lower than
        its old entry says; it then goes as soon as that entry comes up.)
        """
        slot = block.index_slot
        if slot is self._in_window:
            self._window.move_to_end(block.id)
        elif slot is self._in_ahead:  # the predicted read came: an ordinary recent block now
            del self._ahead[block.id]
            self._ahead_bytes -= block.size
            self._window[block.id] = block
            block.index_slot = self._in_window
            self._window_bytes += block.size
            self._drain_window()
        elif type(slot) is tuple and slot[1] is block:
            block.index_slot = self._in_main_dirty
            self._ranking.forget_rejection(block.id)

    def victims(self, need_bytes: int, now: float) -> list[BlockMeta]:
        """Coldest movable blocks freeing at least ``need_bytes`` (fewer if not possible):
        main's by value first, then the window's least recent, then unread prefetches."""
        if need_bytes <= 0:
            return []
        chosen: list[BlockMeta] = []
        freed = 0
        heap = self._heap
        popped: list[_Entry] = []
        dirty = self._in_main_dirty
        while freed < need_bytes and heap:
            entry = heapq.heappop(heap)
            block = entry[1]
            slot = block.index_slot
            if slot is not entry:
                if slot is dirty:  # hit since its entry was made: back in at its value
                    self._rekey(block)
                continue
            popped.append(entry)
            if block.pinned or block.readers > 0:
                continue
            chosen.append(block)
            freed += block.size
        for entry in popped:
            heapq.heappush(heap, entry)
        for segment in (self._window, self._ahead):
            for block in segment.values():
                if freed >= need_bytes:
                    break
                if not (block.pinned or block.readers > 0):
                    chosen.append(block)
                    freed += block.size
        self._pending = {b.id for b in chosen}
        return chosen

    def coldest(self) -> BlockMeta | None:
        """Main's coldest block, its entry clean on top of the heap (dead entries on the way
        are dropped, dirty ones re-keyed)."""
        heap = self._heap
        dirty = self._in_main_dirty
        while heap:
            top = heap[0]
            block = top[1]
            slot = block.index_slot
            if slot is top:
                return block
            heapq.heappop(heap)
            if slot is dirty:
                self._rekey(block)
        return None

    def blocks(self) -> Iterator[BlockMeta]:
        """Every block in the index (window, ahead, then main), for audits and tests."""
        yield from self._window.values()
        yield from self._ahead.values()
        dirty = self._in_main_dirty
        seen: set[str] = set()
        for entry in self._heap:
            block = entry[1]
            slot = block.index_slot
            if slot is entry:
                yield block
            elif slot is dirty and block.id not in seen:  # (an old entry may name it too)
                seen.add(block.id)
                yield block

    # -- window ------------------------------------------------------------------------------

    def _drain_window(self) -> None:
        """Move the window's least recent blocks past its share into main, keyed by history."""
        budget = int(self.window_fraction * self._bytes)
        window = self._window
        history = self._hotness.history_log_key
        discount = self._ranking.discount
        while self._window_bytes > budget and len(window) > 1:
            _, block = window.popitem(last=False)
            self._window_bytes -= block.size
            self._main += 1
            key = history(block, self._inv_recency, discount) + self._cost_log(block)
            cold = self.coldest()
            if cold is not None and not (block.pinned or block.readers > 0):
                admitted = admitted_key(key, self._heap[0][0])
                if admitted != key and self.adaptive:
                    self._ranking.rejected(block)
                key = admitted
            self._push(block, key)


class LruIndex:
    """Least recently used first: the baseline index (kept for comparison and tests)."""

    def __init__(self) -> None:
        self._blocks: dict[str, BlockMeta] = {}

    def add(self, block: BlockMeta, now: float, *, prefetched: bool = False) -> None:
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

"""Promotions the store does not make at once: blocks predicted next (prefetch hints, the
policy's prefetcher) and blocks read while another move held the mover. They wait in a bounded
queue (``memory.max_pending_promotions``, the oldest dropped first) for the maintenance loop, or
for :meth:`PendingPromotions.run` when there is no loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from vramancer.memory.planning import Planning
from vramancer.memory.state import Entry, StoreState, Tier


class PendingPromotions:
    """The queue of promotions and the promotion of a block just read.

    The queue is guarded by the store's metadata lock (``state.lock``); promotions run with the
    mover mutex held. ``after_growth`` is told of every tier a promotion filled (the store runs
    or wakes its eviction cycle), ``wake`` when the queue gained a block, ``closed`` says
    whether the store has closed (nothing moves then)."""

    def __init__(
        self,
        state: StoreState,
        mover: threading.RLock,
        plan: Planning,
        *,
        limit: int,
        top: Callable[[], Tier | None],
        closed: Callable[[], bool],
        after_growth: Callable[[Tier], None],
        wake: Callable[[], None],
    ) -> None:
        self._state = state
        self._mover = mover
        self._plan = plan
        self._limit = limit
        self._top = top
        self._closed = closed
        self._after_growth = after_growth
        self._wake = wake
        #: Block id -> True for a prefetch (not read yet), False for a block that was read.
        self._queued: dict[str, bool] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def discard(self, block_id: str) -> None:
        """Lock held: forget a block (deleted)."""
        self._queued.pop(block_id, None)

    def queue(self, ids: Iterable[str], current: str | None, *, prefetched: bool) -> None:
        """Lock held: queue blocks for promotion (``prefetched``: ahead of their read; a block
        queued both ways counts as read). ``current`` (the block being read) is skipped, and so
        are unknown and pinned blocks and blocks already in the fastest tier."""
        top = self._top()
        blocks, by_name, queued = self._state.blocks, self._state.by_name, self._queued
        added = False
        for block_id in ids:
            if block_id == current:
                continue
            entry = blocks.get(block_id)
            if entry is None or entry.meta.pinned or by_name[entry.meta.tier] is top:
                continue
            queued[block_id] = prefetched and queued.get(block_id, True)
            added = True
            if len(queued) > self._limit:
                del queued[next(iter(queued))]
        if added:
            self._wake()

    def after_read(self, entry: Entry, source: Tier, value: Any, read_s: float) -> None:
        """Promote a block just read (its value in hand: no second read), only if no other
        move is running; otherwise it is queued."""
        if not self._mover.acquire(blocking=False):
            with self._state.lock:
                self.queue([entry.meta.id], None, prefetched=False)
            return
        try:
            if not self._closed():
                target = self._plan.promote_read(entry, source, value, read_s)
                if target is not None:
                    self._after_growth(target)
        finally:
            self._mover.release()

    def run(self) -> int:
        """Promote the queued blocks; returns how many moved."""
        with self._state.lock:
            queued = list(self._queued.items())
            self._queued.clear()
        moved = 0
        for block_id, prefetched in queued:
            with self._mover:
                if self._closed():
                    break
                moved += self._promote(block_id, prefetched=prefetched)
        return moved

    def _promote(self, block_id: str, *, prefetched: bool) -> int:
        """Mover held: promote a queued block; returns 1 if it moved."""
        entry = self._state.blocks.get(block_id)
        if entry is None or entry.meta.pinned:
            return 0
        target = self._plan.promote_queued(entry, prefetched=prefetched)
        if target is None:
            return 0
        self._after_growth(target)
        return 1

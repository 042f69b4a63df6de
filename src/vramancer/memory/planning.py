"""Between the store's live state and the pure planner: snapshots taken under the metadata
lock, plans from ``memory/planner.py``, applied by the mover (``memory/mover.py``).

Every method runs with the store's mover mutex held. A plan is applied move by move, each
rechecked by the mover (a stale move is skipped); what the caller needed (room in a tier, a
block's target) is then checked on the live state. A plan that finds no room moves nothing:
a put then tries the next tier of its placement order, planned afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from vramancer.clock import Clock
from vramancer.errors import Conflict, InsufficientMemory, InsufficientStorage, InvalidInput
from vramancer.memory import planner
from vramancer.memory.compression import CorruptBlock
from vramancer.memory.hotness import HotnessModel
from vramancer.memory.mover import Mover
from vramancer.memory.placement import OrchestratorStrategy
from vramancer.memory.planner import Candidate, Move, NoRoom
from vramancer.memory.records import BlockMeta, TierView
from vramancer.memory.settings import MemorySettings
from vramancer.memory.state import Entry, StoreState, Tier
from vramancer.memory.tiers import TierName
from vramancer.units import format_size

log = logging.getLogger("vramancer.memory.store")


def tier_view(tier: Tier) -> TierView:
    """What placement sees of a tier."""
    spec = tier.spec
    return TierView(
        tier.name, spec.latency, tier.target, tier.used, spec.pressure_high, spec.pressure_low
    )


class Planning:
    """Plans the store's moves on snapshots of its state and has the mover apply them."""

    def __init__(
        self,
        state: StoreState,
        mover: Mover,
        *,
        placement: Callable[[], OrchestratorStrategy],
        hotness: Callable[[], HotnessModel],
        settings: MemorySettings,
        clock: Clock,
    ) -> None:
        self._state = state
        self._mover = mover
        self._placement = placement
        self._hotness = hotness
        self._settings = settings
        self._clock = clock

    def free_bytes(self, tier: Tier, need: int, *, reason: str) -> int:
        """Mover held: plan and apply the demotions (cascading) freeing ``need`` bytes of
        ``tier``; returns how many moved."""
        with self._state.lock:
            states = self._state.tier_states({tier.name: need}, self._clock.monotonic())
        return self._mover.apply(planner.plan_free(states, tier.name, need, reason=reason))

    def make_room(self, tier: Tier, size: int, *, reason: str) -> bool:
        """Mover held: plan and apply the demotions after which ``size`` more bytes fit in
        ``tier``; whether they fit (a plan with no room moves nothing)."""
        with self._state.lock:
            states = self._state.tier_states({tier.name: tier.need(size)}, self._clock.monotonic())
        plan = planner.plan_room(states, tier.name, size, reason=reason)
        if not isinstance(plan, NoRoom):
            self._mover.apply(plan)
        return tier.free >= size

    def plan_up(
        self,
        entry: Entry,
        targets: Sequence[Tier],
        *,
        reason: str,
        colder_than: float | None,
        room_only: bool = False,
    ) -> tuple[list[Move], Tier] | None:
        """The room-making moves and the target of a promotion of ``entry`` into the first of
        ``targets`` that fits (planner's ``plan_promotion``); None: no room."""
        meta = entry.meta
        with self._state.lock:
            now = self._clock.monotonic()
            needs = {
                t.name: t.need(meta.size)
                for t in targets
                if not room_only and meta.size <= t.target
            }
            scorer = self._hotness() if colder_than is not None else None
            states = self._state.tier_states(needs, now, scorer)
            source = meta.tier
        plan = planner.plan_promotion(
            states,
            Candidate(meta.id, meta.size),
            source,
            [t.name for t in targets],
            reason=reason,
            colder_than=colder_than,
            room_only=room_only,
        )
        if isinstance(plan, NoRoom):
            return None
        return plan[:-1], self._state.by_name[plan[-1].target]

    def upward_targets(self, entry: Entry) -> list[Tier]:
        """The tiers above the block's that placement accepts for it, in its order."""
        now = self._clock.monotonic()
        with self._state.lock:
            views = [tier_view(t) for t in self._state.tiers]
            names = self.targets(entry.meta.id, views, now)
        return [self._state.by_name[n] for n in names]

    def targets(self, block_id: str, views: Sequence[TierView], now: float) -> tuple[str, ...]:
        """Lock held: names of the tiers above the block's that placement accepts for it."""
        entry = self._state.blocks[block_id]
        current = self._state.by_name[entry.meta.tier]
        order = self._placement().place(entry.meta, views, now)
        by_name = self._state.by_name
        return tuple(
            n
            for n in order
            if n in by_name
            and by_name[n].spec.latency < current.spec.latency
            and self._state.may_hold(entry, by_name[n])
        )

    def scorer(self, now: float) -> Callable[[BlockMeta], float]:
        score = self._hotness().score
        return lambda meta: score(meta, now)

    def room_for_new(self, meta: BlockMeta, order: Sequence[str]) -> Tier | None:
        """The first tier of ``order`` that has room, after the planned demotions if needed.
        A tier whose plan finds no room moves nothing; the next one is planned afresh."""
        for name in order:
            tier = self._state.by_name.get(name)
            if tier is None or meta.size > tier.target:
                continue
            if tier.free >= meta.size:
                return tier
            if tier.lower and self.make_room(tier, meta.size, reason="room"):
                return tier
        return None

    def disk_order(self, order: Sequence[str], size: int) -> list[str]:
        """The disk tiers of a placement ``order`` (all disk tiers, fastest first, if it names
        none): where a durable put may land."""
        disk = [n for n in order if n in self._state.by_name and self._state.by_name[n].is_disk]
        if not disk:
            disk = [t.name for t in self._state.tiers if t.is_disk and t.target >= size]
        if not disk:
            raise Conflict(
                "a durable put needs a disk tier (L5 or L6) that can hold "
                f"{format_size(size)}, and none is present",
                requested_bytes=size,
            )
        return disk

    def explicit_target(
        self, entry: Entry, current: Tier, target: Tier, *, upward: bool
    ) -> Tier | None:
        """``target`` checked (direction, durability, size) with room made in it."""
        size = entry.meta.size
        if target is current:
            return None
        if not self._state.may_hold(entry, target):
            raise Conflict(
                f"block {entry.meta.id!r} was put durably: it stays on a disk tier "
                "(put it again without durable to let it move into memory)"
            )
        if (target.spec.latency < current.spec.latency) != upward:
            way = "up" if upward else "down"
            raise InvalidInput(f"{target.name} is not {way} from {current.name}", field="tier")
        if size > target.target:
            raise InsufficientMemory(
                f"{target.name} cannot hold a block of {format_size(size)}",
                requested_bytes=size,
                available_bytes=target.free,
            )
        if target.free < size and target.lower:
            self.make_room(target, size, reason="room")
        if target.free < size:
            raise InsufficientMemory(
                f"no room in {target.name} for {format_size(size)}",
                requested_bytes=size,
                available_bytes=target.free,
            )
        return target

    def explicit_up(self, entry: Entry, current: Tier) -> Tier | None:
        """The fastest tier above that placement accepts and that has room, else the tier just
        above (room made there)."""
        if current.up is None or not self._state.may_hold(entry, current.up):
            return None
        planned = self.plan_up(
            entry, self.upward_targets(entry), reason="explicit", colder_than=None, room_only=True
        )
        if planned is not None:
            return planned[1]
        return self.explicit_target(entry, current, current.up, upward=True)

    def explicit_down(self, entry: Entry, current: Tier) -> Tier | None:
        """The nearest tier below with room, room made there (cascading) if none has any."""
        if not current.lower:
            return None
        meta = entry.meta
        with self._state.lock:
            # Victims are looked up only when no tier below has the room already.
            room = any(t.free >= meta.size for t in current.lower)
            needs = {} if room else {t.name: t.need(meta.size) for t in current.lower}
            states = self._state.tier_states(needs, self._clock.monotonic())
        plan = planner.plan_demotion(states, Candidate(meta.id, meta.size), current.name)
        if isinstance(plan, NoRoom):
            raise InsufficientMemory(
                f"no tier below {current.name} has room for {format_size(meta.size)}",
                requested_bytes=meta.size,
                available_bytes=max(t.free for t in current.lower),
            )
        self._mover.apply(plan[:-1])
        return self._state.by_name[plan[-1].target]

    def explicit_choice(
        self, entry: Entry, current: Tier, target: Tier | None, *, upward: bool
    ) -> Tier | None:
        """Where an explicit move of ``entry`` goes (room made there): ``target`` checked, or
        the nearest tier up / down; None when it stays."""
        if target is not None:
            return self.explicit_target(entry, current, target, upward=upward)
        if upward:
            return self.explicit_up(entry, current)
        return self.explicit_down(entry, current)

    def demote_many(self, entries: Sequence[Entry], target: Tier | None) -> dict[str, str]:
        """Move ``entries`` down, each where :meth:`explicit_choice` sends it, the moves applied
        together so that those into one file tier are written as one batch (``Mover.apply``).
        When the room a block needs is taken by the blocks chosen before it, those move
        first. A pinned block is a ``Conflict`` before anything moves; a block that cannot
        move raises as a demote of it alone would, once the moves chosen before it are
        applied. Returns the tier each block is in."""
        pinned = [e.meta.id for e in entries if e.meta.pinned]
        if pinned:
            raise Conflict(f"block {pinned[0]!r} is pinned; unpin it to move it")
        moves: list[Move] = []
        taken: dict[str, int] = {}
        try:
            for entry in entries:
                meta = entry.meta
                chosen = self._down(entry, target)
                if chosen is not None and chosen.free - taken.get(chosen.name, 0) < meta.size:
                    self._mover.apply(moves)
                    moves, taken = [], {}
                    chosen = self._down(entry, target)
                if chosen is None:
                    continue
                moves.append(Move(meta.id, meta.size, meta.tier, chosen.name, "explicit"))
                taken[chosen.name] = taken.get(chosen.name, 0) + meta.size
        finally:
            self._mover.apply(moves)
        with self._state.lock:
            return {e.meta.id: e.meta.tier for e in entries}

    def _down(self, entry: Entry, target: Tier | None) -> Tier | None:
        current = self._state.by_name[entry.meta.tier]
        return self.explicit_choice(entry, current, target, upward=False)

    def promote_read(self, entry: Entry, source: Tier, value: Any, read_s: float) -> Tier | None:
        """Promote a block just read in ``source`` (its ``value`` read in ``read_s``) one tier
        up, room made only from blocks colder than it; returns where it went (None: it
        stayed). A failed promotion is logged: the read itself succeeded."""
        up = source.up
        if up is None or entry.meta.tier != source.name:
            return None
        try:
            score = self._hotness().score(entry.meta, self._clock.monotonic())
            planned = self.plan_up(entry, [up], reason="hit", colder_than=score)
            if planned is None:
                return None
            self._mover.apply(planned[0])
            if up.fits(entry.meta.size) and self._mover.relocate(
                entry, up, "hit", value=value, owned=source.is_disk, read_s=read_s
            ):
                return up
        except CorruptBlock:
            log.exception("promotion of %r failed", entry.meta.id)
        except InsufficientStorage as exc:
            log.warning("promotion of %r skipped: %s", entry.meta.id, exc.message)
        return None

    def promote_queued(self, entry: Entry, *, prefetched: bool) -> Tier | None:
        """Promote a queued block to the fastest tier placement accepts that has room, or can
        make it from blocks colder than ``memory.promote_threshold``; returns where it went."""
        reason = "prefetch" if prefetched else "hit"
        try:
            planned = self.plan_up(
                entry,
                self.upward_targets(entry),
                reason=reason,
                colder_than=self._settings.promote_threshold,
            )
            if planned is None:
                return None
            self._mover.apply(planned[0])
            if self._mover.relocate(entry, planned[1], reason, prefetched=prefetched):
                return planned[1]
        except CorruptBlock:
            log.exception("prefetch of %r failed", entry.meta.id)
        except InsufficientStorage as exc:
            log.warning("prefetch of %r skipped: %s", entry.meta.id, exc.message)
        return None

    def warmup(self, max_blocks: int) -> int:
        """Promote the hottest blocks that sit below their best tier, where there is room
        (no eviction). Returns how many moved."""
        now = self._clock.monotonic()
        floor = self._settings.cold_threshold
        with self._state.lock:
            views = self._state.block_views(
                lambda e, t: not e.meta.pinned and t.up is not None, self.scorer(now)
            )
            tier_views = [tier_view(t) for t in self._state.tiers]
            picked = [
                planner.BlockView(
                    v.id, v.size, v.tier, v.score, self.targets(v.id, tier_views, now)
                )
                for v in planner.pick_hottest(views, max_blocks, floor)
            ]
            states = self._state.tier_states()
        return self._mover.apply(
            planner.plan_warmup(states, picked, max_blocks=max_blocks, floor=floor)
        )

    def compress(self, max_blocks: int) -> int:
        """Move the coldest L4 blocks (hotness at or under ``memory.cold_threshold``) to L5/L6,
        where there is room. Returns how many moved."""
        now = self._clock.monotonic()
        host = TierName.L4.value
        if host not in self._state.by_name:
            return 0
        with self._state.lock:
            views = self._state.block_views(
                lambda e, t: t.name == host and not e.meta.pinned and e.meta.readers == 0,
                self.scorer(now),
            )
            states = self._state.tier_states()
        moves = planner.plan_compress(
            states, views, source=host, max_blocks=max_blocks, floor=self._settings.cold_threshold
        )
        return self._mover.apply(moves)

    def spill(self) -> int:
        """Move every block of L1–L4 (pinned ones too) to L5/L6 where there is room, hottest
        first. Returns how many moved."""
        now = self._clock.monotonic()
        with self._state.lock:
            views = self._state.block_views(lambda e, t: not t.is_disk, self.scorer(now))
            states = self._state.tier_states()
        return self._mover.apply(
            planner.plan_spill(states, views),
            allow_pinned=True,
            tolerate=(CorruptBlock, OSError, InsufficientStorage),
        )

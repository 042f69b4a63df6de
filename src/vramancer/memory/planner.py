"""Pure plans of the tiered store's moves: which block goes to which tier, in what order.

Every function here takes frozen snapshots (:class:`TierState`, :class:`BlockView`) and returns
an ordered list of :class:`Move` values, or :class:`NoRoom`; none does I/O, takes a lock or
changes its inputs. The store (``memory/store.py``) builds the snapshots under its metadata
lock and hands the plan to the mover (``memory/mover.py``), which applies the moves one by one,
rechecking each.

Room is made by cascading demotions: a victim of a tier goes to the nearest slower tier with
room; when none has room, that slower tier first makes room the same way (its own victims go
further down). The victims of each tier are the tier's eviction index's choice, in its order
(``TierState.victims``, coldest first); a plan takes them in that order until enough bytes are
freed. A plan lists the cascaded moves before the move that needs their room.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vramancer.memory.promotion import bytes_to_free


@dataclass(frozen=True, slots=True)
class Candidate:
    """A block a tier's eviction index offers as a victim, and its hotness score then."""

    id: str
    size: int
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class TierState:
    """One tier at planning time. ``victims``: what its eviction index would demote, in order
    (only the tiers a plan may take room from carry them)."""

    name: str
    latency: float
    target: int
    used: int
    pressure_high: float
    pressure_low: float
    disk: bool = False
    victims: tuple[Candidate, ...] = ()

    @property
    def free(self) -> int:
        return max(0, self.target - self.used)


@dataclass(frozen=True, slots=True)
class BlockView:
    """A block as warmup, compression and spill see it. ``targets``: the tiers above it that
    placement accepts for it, in preference order (warmup only)."""

    id: str
    size: int
    tier: str
    score: float
    targets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Move:
    """Move block ``block_id`` (``size`` bytes) from tier ``source`` to tier ``target``."""

    block_id: str
    size: int
    source: str
    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class NoRoom:
    """No plan makes room for ``size`` bytes in ``tier`` (None: in any tier asked for)."""

    tier: str | None
    size: int
    available: int


# --------------------------------------------------------------------------------------------
# Simulation of the tiers' use while a plan is built (private, per call)
# --------------------------------------------------------------------------------------------


class _Sim:
    """The tiers' used bytes and the victims already taken, as the plan so far leaves them."""

    def __init__(self, tiers: Sequence[TierState], exclude: Iterable[str] = ()) -> None:
        self.tiers = tuple(tiers)
        self.pos = {t.name: i for i, t in enumerate(self.tiers)}
        self.used = [t.used for t in self.tiers]
        self.taken: set[str] = set(exclude)
        self.moves: list[Move] = []

    def copy(self) -> _Sim:
        other = _Sim(self.tiers)
        other.used = list(self.used)
        other.taken = set(self.taken)
        other.moves = list(self.moves)
        return other

    def free(self, i: int) -> int:
        return max(0, self.tiers[i].target - self.used[i])

    def need(self, i: int, incoming: int, *, force: bool = False) -> int:
        t = self.tiers[i]
        return bytes_to_free(
            self.used[i], t.target, incoming, t.pressure_high, t.pressure_low, force=force
        )

    def fits(self, i: int, size: int) -> bool:
        """Whether ``size`` more bytes keep tier ``i`` at or under its high mark."""
        return self.need(i, size) == 0

    def move(self, block_id: str, size: int, src: int, dst: int, reason: str) -> None:
        self.moves.append(Move(block_id, size, self.tiers[src].name, self.tiers[dst].name, reason))
        self.used[src] -= size
        self.used[dst] += size
        self.taken.add(block_id)

    def victims(self, i: int, need: int) -> list[Candidate]:
        """The tier's next victims (not taken yet) freeing at least ``need`` bytes."""
        chosen: list[Candidate] = []
        freed = 0
        for victim in self.tiers[i].victims:
            if freed >= need:
                break
            if victim.id not in self.taken:
                chosen.append(victim)
                freed += victim.size
        return chosen

    def free_bytes(self, i: int, need: int, reason: str, colder_than: float | None) -> int:
        """Demote victims of tier ``i`` (cascading) until ``need`` bytes are free; with
        ``colder_than``, nothing moves unless every victim scores below it."""
        if need <= 0 or i + 1 >= len(self.tiers):
            return 0
        victims = self.victims(i, need)
        if colder_than is not None and any(v.score >= colder_than for v in victims):
            return 0
        freed = 0
        for victim in victims:
            if freed >= need:
                break
            target = self.room_below(i, victim.size)
            if target is None:
                break
            self.move(victim.id, victim.size, i, target, reason)
            freed += victim.size
        return freed

    def room_below(self, i: int, size: int) -> int | None:
        """The nearest tier below ``i`` with room for ``size`` bytes, making room if needed."""
        below = range(i + 1, len(self.tiers))
        for j in below:
            if self.free(j) >= size:
                return j
        for j in below:
            if size <= self.tiers[j].target and j + 1 < len(self.tiers):
                self.free_bytes(j, self.need(j, size), "evict", None)
                if self.free(j) >= size:
                    return j
        return None


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def plan_free(
    tiers: Sequence[TierState],
    tier: str,
    need: int,
    *,
    reason: str = "evict",
    colder_than: float | None = None,
) -> list[Move]:
    """Moves freeing up to ``need`` bytes of ``tier`` (fewer when the victims or the room
    below run out): an eviction cycle, a shrunk budget, a forced eviction."""
    sim = _Sim(tiers)
    sim.free_bytes(sim.pos[tier], need, reason, colder_than)
    return sim.moves


def plan_room(
    tiers: Sequence[TierState],
    tier: str,
    size: int,
    *,
    reason: str = "room",
    colder_than: float | None = None,
) -> list[Move] | NoRoom:
    """Moves after which ``size`` more bytes fit in ``tier`` (within its budget; above its high
    mark the tier also drops to its low mark), or :class:`NoRoom` (and nothing should move)."""
    sim = _Sim(tiers)
    i = sim.pos[tier]
    if size <= tiers[i].target and sim.free(i) < size:
        sim.free_bytes(i, sim.need(i, size), reason, colder_than)
    if sim.free(i) >= size:
        return sim.moves
    return NoRoom(tier, size, sim.free(i))


def plan_demotion(
    tiers: Sequence[TierState], block: Candidate, source: str, *, reason: str = "explicit"
) -> list[Move] | NoRoom:
    """Move ``block`` from ``source`` to the nearest slower tier with room, after making room
    there (cascading) if no slower tier has any."""
    sim = _Sim(tiers, exclude=(block.id,))
    i = sim.pos[source]
    target = sim.room_below(i, block.size)
    if target is None:
        below = [sim.free(j) for j in range(i + 1, len(sim.tiers))]
        return NoRoom(None, block.size, max(below, default=0))
    sim.move(block.id, block.size, i, target, reason)
    return sim.moves


def plan_promotion(
    tiers: Sequence[TierState],
    block: Candidate,
    source: str,
    targets: Sequence[str],
    *,
    reason: str = "hit",
    colder_than: float | None = None,
    room_only: bool = False,
) -> list[Move] | NoRoom:
    """Move ``block`` up from ``source`` into the first of ``targets`` (faster tiers, in
    preference order) where it fits without passing the tier's high mark.

    Unless ``room_only``, a target without room may make it by demoting its victims, but only
    if every one of them scores under ``colder_than`` (a promotion never pushes out warmer
    blocks); targets are tried in order and the first that then fits wins. The last move of
    the plan is the block's own."""
    sim = _Sim(tiers, exclude=(block.id,))
    src = sim.pos[source]
    above = [sim.pos[n] for n in targets if n in sim.pos]
    for i in above:
        if sim.fits(i, block.size):
            sim.move(block.id, block.size, src, i, reason)
            return sim.moves
    if not room_only:
        for i in above:
            if block.size > tiers[i].target:
                continue
            trial = sim.copy()
            trial.free_bytes(i, trial.need(i, block.size), "room", colder_than)
            if trial.fits(i, block.size):
                trial.move(block.id, block.size, src, i, reason)
                return trial.moves
    best = max((sim.free(i) for i in above), default=0)
    return NoRoom(targets[0] if len(targets) == 1 else None, block.size, best)


def plan_warmup(
    tiers: Sequence[TierState], blocks: Iterable[BlockView], *, max_blocks: int, floor: float
) -> list[Move]:
    """Promote the ``max_blocks`` hottest of ``blocks`` scoring above ``floor``, hottest first,
    each into the first of its ``targets`` with room under the high mark (no eviction)."""
    sim = _Sim(tiers)
    for block in pick_hottest(blocks, max_blocks, floor):
        src = sim.pos[block.tier]
        for name in block.targets:
            i = sim.pos.get(name)
            if i is not None and sim.fits(i, block.size):
                sim.move(block.id, block.size, src, i, "warmup")
                break
    return sim.moves


def plan_compress(
    tiers: Sequence[TierState],
    blocks: Iterable[BlockView],
    *,
    source: str,
    max_blocks: int,
    floor: float,
) -> list[Move]:
    """Move the ``max_blocks`` coldest of ``blocks`` in ``source`` scoring at or under
    ``floor``, coldest first, each to the first disk tier below ``source`` with room for it."""
    sim = _Sim(tiers)
    src = sim.pos[source]
    disk = [j for j in range(src + 1, len(sim.tiers)) if sim.tiers[j].disk]
    cold = [b for b in blocks if b.tier == source]
    for block in heapq.nsmallest(max_blocks, cold, key=_score):
        if block.score > floor:
            break
        target = next((j for j in disk if sim.free(j) >= block.size), None)
        if target is not None:
            sim.move(block.id, block.size, src, target, "compress")
    return sim.moves


def plan_spill(tiers: Sequence[TierState], blocks: Iterable[BlockView]) -> list[Move]:
    """Move every block of a memory tier (L1–L4) to the first disk tier with room for it,
    hottest first; blocks that find no room stay."""
    sim = _Sim(tiers)
    disk = [j for j, t in enumerate(sim.tiers) if t.disk]
    volatile = [b for b in blocks if not sim.tiers[sim.pos[b.tier]].disk]
    for block in sorted(volatile, key=lambda b: -b.score):
        target = next((j for j in disk if sim.free(j) >= block.size), None)
        if target is not None:
            sim.move(block.id, block.size, sim.pos[block.tier], target, "spill")
    return sim.moves


def pick_hottest(blocks: Iterable[BlockView], max_blocks: int, floor: float) -> list[BlockView]:
    """The ``max_blocks`` hottest blocks scoring above ``floor``, hottest first."""
    hottest = heapq.nlargest(max_blocks, blocks, key=_score)
    return [b for b in hottest if b.score > floor]


def _score(block: BlockView) -> float:
    return block.score

"""Pure memory policies: hotness, placement, eviction order, promotion, prefetch.

The store (``memory/store.py``) and the policy benchmark (``bench/memory/policy.py``) drive these
same objects. No I/O, no locks, no clock reads: ``now`` (monotonic seconds) is always passed in,
and the store calls everything here under its own lock.

The default policy, in one paragraph. A block's hotness is its hit count decayed with a
half-life (60 s by default): recent hits weigh more, old ones fade, so the count is LFU and LRU
at once. Each tier keeps a :class:`HotnessIndex`: a small recency *window* (1 % of the tier, in
LRU order) in front of a *main* region ordered by ``(coldness × size) / (reload_cost +
priority)``. Because every count decays at the same rate, the order of decayed counts never
changes with time, so main is a heap keyed by a time-invariant number (log2 of the count
referred to a fixed epoch) and is never re-scored. A block leaving the window takes a place in
main only if its history (its hits before the latest) beats main's coldest block — the
admission duel of W-TinyLFU, with an exact per-block history instead of a sketch (the store
keeps every block's metadata anyway) — which keeps loops and scans from washing the tier out.
How fast the ranking forgets (LFU-like or LRU-like) is learned per tier from ghost hits, as ARC
does: a block evicted after one read that comes back asks for more recency, one evicted after
several asks for more frequency. Placement learns, per hint, how often a written block is read
again; a :class:`SequentialPrefetcher` recognises ``…/7`` then ``…/8`` (and learned successor
pairs) and names the next blocks so the store promotes them ahead of the reader.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vramancer.errors import InvalidInput

# --------------------------------------------------------------------------------------------
# Constants (defaults; ``PolicyConfig`` carries the values actually used)
# --------------------------------------------------------------------------------------------

#: Half-life of the decayed hit count, seconds (``memory.half_life_s``).
DEFAULT_HALF_LIFE_S = 60.0
#: A block read from a slower tier is promoted when its hotness is at least this.
DEFAULT_PROMOTE_THRESHOLD = 1.0
#: Share of a tier's bytes given to the recency window (W-TinyLFU's 1 %).
DEFAULT_WINDOW_FRACTION = 0.01
#: The eviction ranking decays counts with ``half_life × 2^x``; ghost hits move ``x`` within
#: these bounds (small x: the ranking tends to LRU; large x: to LFU). The wide range keeps the
#: policy right whatever the request rate is against the configured half-life.
RECENCY_LOG2_MIN = -10.0
RECENCY_LOG2_MAX = 6.0
#: Ghosts: a block evicted with a count under this is "seen once" (no earlier hit left with a
#: weight over 1/16); ghost lists hold at most max(blocks in the index, GHOST_MIN_BLOCKS) ids
#: each, and never more than GHOST_MAX.
GHOST_MORE_HITS = 1.0625
GHOST_MIN_BLOCKS = 64
GHOST_MAX = 65536
#: Above ``GHOST_GAIN_FROM``, a ghost hit's step (ARC's) is multiplied by up to
#: ``1 + GHOST_RECENCY_GAIN`` (linearly from that weight to 1): near the recency end (a working
#: set that moved) the ranking moves fast both ways, so it goes back towards frequency soon after
#: the new set is in; at or below it the step is ARC's, so a stable popularity (weight near 0)
#: is not pulled off by stray hits, and the weight does not overshoot into the frequency end.
GHOST_RECENCY_GAIN = 24.0
GHOST_GAIN_FROM = 0.6
#: Most share of an index's bytes held by prefetched blocks waiting for their read.
PREFETCH_SHARE = 0.1
#: A block leaving the window must beat main's coldest by this much (log2 of value) to take a
#: place among the incumbents; otherwise it is the next victim.
DUEL_MARGIN_LOG2 = 0.1
#: The ranking is rebuilt when the learned ``x`` has moved by this much.
RERANK_STEP = 0.5
#: The window's duel discounts a block's latest hit fully at or above this ``x``, not at all at
#: or below the other (see ``_discount``).
DISCOUNT_FULL_AT = -1.0
DISCOUNT_NONE_AT = -4.0
#: Reloading a block costs ``latency × (1 + size / RELOAD_UNIT_BYTES)``: a fixed per-move cost
#: about equal to moving 256 KiB (an NVMe access or a kernel launch plus a copy).
DEFAULT_RELOAD_UNIT_BYTES = 256 * 1024
#: Latency of the tier a block is reloaded from when the index is not told (an L5-like SSD).
DEFAULT_RELOAD_LATENCY = 16.0
#: log2 hotness given to a block that was never read (written or prefetched only): colder than
#: any block read in the last 30 half-lives.
NEVER_READ_LOG2 = -30.0
#: Dead heap entries tolerated before the heap is rebuilt (and at least this share of live ones).
COMPACT_MIN_DEAD = 1024
#: Prefetcher: most streams and successor pairs remembered, most ids predicted per access.
PREFETCH_MAX_STREAMS = 4096
PREFETCH_MAX_SUCCESSORS = 65536
DEFAULT_PREFETCH_DEPTH = 4
#: Prefetcher: a stream must advance by +1 this many times before it is trusted.
PREFETCH_MIN_RUN = 2
#: Prefetcher: a learned successor must be seen this many times before it is predicted.
PREFETCH_MIN_SUCCESSOR_COUNT = 2
#: Prefetcher: predictions still open (waiting to be confirmed) are forgotten beyond this many.
PREFETCH_MAX_OUTSTANDING = 4096
#: Prefetcher: a prediction not read within this many accesses counts as wrong.
PREFETCH_HORIZON = 64
#: Prefetcher: a kind of prediction whose accuracy (EWMA) is under this stays silent, except
#: one access in ``PREFETCH_RETRY_EVERY`` (to notice a pattern coming back).
PREFETCH_MIN_ACCURACY = 0.25
PREFETCH_ACCURACY_ALPHA = 0.05
PREFETCH_RETRY_EVERY = 64
#: Placement: decay per put of a hint's counts of puts and first reads, and the most hints kept.
HINT_ALPHA = 0.05
MAX_HINTS = 1024
#: Placement: a block whose hint is re-read less often than this starts below the fastest tier
#: when that tier is under pressure.
COLD_HINT_REREAD_RATE = 0.05
#: Placement: fraction of observations before a hint's learned rate is trusted.
HINT_MIN_OBSERVATIONS = 32
#: Learned reload cost: EWMA weight of one measured move.
COST_ALPHA = 0.1


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class BlockMeta:
    """Metadata of one block, owned and mutated by the store under its lock (data is elsewhere).

    Slots keep it small: a million blocks must fit in well under 500 bytes each.
    """

    id: str
    size: int
    tier: str
    priority: int = 0
    pinned: bool = False
    hint: str | None = None
    #: Decayed hit count (LFU part), valid at ``last_access``. 0 means never read.
    hits: float = 0.0
    #: Monotonic time of the last access (LRU part); the store sets it to ``created`` on put.
    last_access: float = 0.0
    created: float = 0.0
    #: Codec of the stored bytes on L5/L6 (``none``, ``zstd``, ...).
    compression: str = "none"
    #: Readers currently holding the block; a block being read is never freed.
    readers: int = 0
    #: Opaque slot for the eviction index (heap entry, window marker ...). Only the index that
    #: holds the block touches it; ``None`` when the block is in no index.
    index_slot: object | None = field(default=None, repr=False)

    def __lt__(self, other: BlockMeta) -> bool:
        """Tie-break for heap entries with equal keys (never compared otherwise)."""
        return self.id < other.id


@dataclass(frozen=True, slots=True)
class TierView:
    """What placement needs to know about a tier, frozen at decision time."""

    name: str
    latency: float
    capacity_bytes: int
    used_bytes: int
    #: The tier's own watermarks (``[memory.tiers.X]`` overrides); None: the policy's.
    pressure_high: float | None = None
    pressure_low: float | None = None

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def pressure(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 1.0


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Every tunable of the default policy. ``default_policy(settings)`` fills it from config."""

    half_life_s: float = DEFAULT_HALF_LIFE_S
    promote_threshold: float = DEFAULT_PROMOTE_THRESHOLD
    #: A tier above this used/capacity is under pressure (eviction runs, cold blocks go down).
    pressure_high: float = 0.9
    #: The eviction cycle frees down to this used/capacity.
    pressure_low: float = 0.75
    window_fraction: float = DEFAULT_WINDOW_FRACTION
    adaptive_ranking: bool = True
    reload_unit_bytes: int = DEFAULT_RELOAD_UNIT_BYTES
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise InvalidInput("half_life_s must be positive", field="half_life_s")
        if not 0.0 < self.window_fraction < 1.0:
            raise InvalidInput("window_fraction must be in (0, 1)", field="window_fraction")
        if self.pressure_low > self.pressure_high:
            raise InvalidInput("pressure_low must not be above pressure_high", field="pressure_low")
        if self.reload_unit_bytes <= 0:
            raise InvalidInput("reload_unit_bytes must be positive", field="reload_unit_bytes")
        if self.prefetch_depth < 0:
            raise InvalidInput("prefetch_depth must not be negative", field="prefetch_depth")


# --------------------------------------------------------------------------------------------
# Protocols (extension points, seed 000)
# --------------------------------------------------------------------------------------------


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

    def add(self, block: BlockMeta, now: float, *, prefetched: bool = False) -> None:
        """A block entered the tier; ``prefetched``: promoted ahead of its read."""
        ...

    def remove(self, block: BlockMeta) -> None: ...

    def touch(self, block: BlockMeta, now: float) -> None: ...

    def victims(self, need_bytes: int, now: float) -> list[BlockMeta]:
        """Blocks whose removal frees at least ``need_bytes`` (fewer if not possible)."""
        ...

    def __len__(self) -> int: ...


class Prefetcher(Protocol):
    """Learns access sequences (block k then k+1) and names blocks worth promoting ahead."""

    def observe(self, block_id: str, now: float) -> Sequence[str]: ...


# --------------------------------------------------------------------------------------------
# Hotness
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Reload cost
# --------------------------------------------------------------------------------------------


class ReloadCostModel:
    """What it costs to bring a block back once evicted, in relative-latency units.

    Static: ``latency × (1 + size / unit_bytes)`` where ``latency`` is the relative latency of the
    tier the block would be reloaded from (1, 1.3, 2.5, 5, 16, 50 for L1..L6). Learned: the store
    may report measured moves with :meth:`observe`; once a tier has measurements, its cost is
    the measured seconds for that size, scaled so that the static and learned figures agree on
    a block of ``unit_bytes`` (the tier's configured latency stays the unit of account).
    """

    def __init__(self, unit_bytes: int = DEFAULT_RELOAD_UNIT_BYTES) -> None:
        if unit_bytes <= 0:
            raise InvalidInput("reload unit must be positive", field="reload_unit_bytes")
        self.unit_bytes = unit_bytes
        #: tier -> (EWMA seconds per move fixed part, EWMA seconds per byte, samples)
        self._learned: dict[str, tuple[float, float, int]] = {}

    def cost(self, size: int, latency: float, tier: str | None = None) -> float:
        """Cost of reloading ``size`` bytes from a tier of relative ``latency``."""
        static = latency * (1.0 + size / self.unit_bytes)
        learned = self._learned.get(tier) if tier is not None else None
        if learned is None or learned[2] < 2:
            return static
        fixed_s, per_byte_s, _ = learned
        reference_s = fixed_s + per_byte_s * self.unit_bytes
        if reference_s <= 0.0:
            return static
        # Scale: a block of unit_bytes costs 2 × latency in both models.
        return 2.0 * latency * (fixed_s + per_byte_s * size) / reference_s

    def observe(self, tier: str, size: int, seconds: float) -> None:
        """Record a measured reload (a move out of ``tier``) of ``size`` bytes taking ``seconds``.

        Splits the time into a fixed part and a per-byte part with the static model's ratio as a
        prior, then smooths both with an EWMA.
        """
        if seconds < 0 or size < 0:
            return
        share_fixed = self.unit_bytes / (self.unit_bytes + size)
        fixed = seconds * share_fixed
        per_byte = (seconds - fixed) / size if size else 0.0
        old = self._learned.get(tier)
        if old is None:
            self._learned[tier] = (fixed, per_byte, 1)
            return
        a = COST_ALPHA
        if per_byte == 0.0:
            per_byte = old[1]
        self._learned[tier] = (
            old[0] + a * (fixed - old[0]),
            old[1] + a * (per_byte - old[1]),
            old[2] + 1,
        )


# --------------------------------------------------------------------------------------------
# Eviction index
# --------------------------------------------------------------------------------------------

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
    one, which the window has already rewarded. If that does not beat main's coldest block by
    ``DUEL_MARGIN_LOG2`` it goes below every block (newest loser first): W-TinyLFU's rejected
    candidate. So a block seen once (a scan, a loop that does not fit) is the next to go, while
    a block that keeps coming back climbs.

    The ranking decays counts with its own half-life ``half_life × 2^x`` (LRFU's knob: small
    ``x`` ranks by recency, large ``x`` by frequency). With ``adaptive``, ``x`` follows ghost
    hits like ARC's ``p``: the ids of evicted blocks are remembered (seen-once and seen-more
    lists, as many ids as blocks in the index); a seen-once ghost coming back moves ``x``
    towards recency, a seen-more one towards frequency. In the recency regime the window's duel
    also stops discounting the latest hit (``_discount``). A change of ``x`` by
    ``RERANK_STEP`` rebuilds the heap in O(n) (keys shift by ``stamp × Δ(1/half-life)``).

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
        recency_factor: float = 1.0,
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
        x = min(RECENCY_LOG2_MAX, max(RECENCY_LOG2_MIN, math.log2(recency_factor)))
        #: Recency weight in [0, 1] (ARC's p / c): 0 ranks by frequency, 1 by recency.
        self.recency_weight = (RECENCY_LOG2_MAX - x) / (RECENCY_LOG2_MAX - RECENCY_LOG2_MIN)
        self._x = x
        self._inv_recency = 1.0 / (hotness.half_life_s * math.pow(2.0, x))
        self._discount = _discount(x)
        #: Ids returned by the last ``victims`` call: a ``remove`` of one of them is an eviction.
        self._pending: set[str] = set()
        #: Ghosts of evicted blocks (ids only), seen-once and seen-more-often, oldest first.
        self._ghost_once: OrderedDict[str, None] = OrderedDict()
        self._ghost_more: OrderedDict[str, None] = OrderedDict()

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

    def _ghost_hit(self, block: BlockMeta) -> None:
        """A block comes back after an eviction: learn which way the ranking should lean.

        ARC's rule: a returning seen-once block says "more recency" (an LRU would have kept
        it), a returning seen-more-often one says "more frequency"; each moves the recency
        weight by ``max(1, |other ghosts| / |its ghosts|) / blocks``. The ranking follows once
        it has moved by ``RERANK_STEP`` (a heap rebuild). Near the recency end the step is
        larger (``GHOST_RECENCY_GAIN``): the 2^x range is wide and a shifted working set drives
        the weight to 1, from where ARC's step takes hundreds of ghost hits to come back.
        """
        once, more = self._ghost_once, self._ghost_more
        scale = 1.0 / max(self._count, GHOST_MIN_BLOCKS)
        if block.id in once:
            step = max(1.0, len(more) / len(once)) * scale
            del once[block.id]
        elif block.id in more:
            step = -max(1.0, len(once) / len(more)) * scale
            del more[block.id]
        else:
            return
        lean = (self.recency_weight - GHOST_GAIN_FROM) / (1.0 - GHOST_GAIN_FROM)
        if lean > 0.0:
            step *= 1.0 + GHOST_RECENCY_GAIN * lean
        weight = min(1.0, max(0.0, self.recency_weight + step))
        self.recency_weight = weight
        x = RECENCY_LOG2_MAX - weight * (RECENCY_LOG2_MAX - RECENCY_LOG2_MIN)
        if abs(x - self._x) >= RERANK_STEP or (x != self._x and weight in (0.0, 1.0)):
            self._x = x
            self._discount = _discount(x)
            self._rerank(1.0 / (self._hotness.half_life_s * math.pow(2.0, x)))

    def _remember_eviction(self, block: BlockMeta) -> None:
        ghosts = self._ghost_once if block.hits < GHOST_MORE_HITS else self._ghost_more
        ghosts[block.id] = None
        limit = max(self._count, GHOST_MIN_BLOCKS)
        limit = min(limit, GHOST_MAX)
        while len(ghosts) > limit:
            ghosts.popitem(last=False)

    def _rerank(self, inv_recency: float) -> None:
        """Change the ranking decay: every key's recency term moves, so the heap is rebuilt.

        O(n), at most once per climbing sample (which lasts at least 10 accesses per block).
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
                self._remember_eviction(block)
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
        while self._window_bytes > budget and len(window) > 1:
            _, block = window.popitem(last=False)
            self._window_bytes -= block.size
            self._main += 1
            key = history(block, self._inv_recency, self._discount) + self._cost_log(block)
            cold = self.coldest()
            if cold is not None and not (block.pinned or block.readers > 0):
                cold_key = self._heap[0][0]
                if key <= cold_key + DUEL_MARGIN_LOG2:
                    # Lost the duel: it goes below every block, newest loser first (W-TinyLFU
                    # evicts the rejected candidate; equals never displace incumbents).
                    key = math.nextafter(min(key, cold_key), -math.inf)
            self._push(block, key)


def _discount(x: float) -> float:
    """Share of its latest hit a block leaving the window is *not* credited with.

    1 in the frequency regime (``x`` ≥ ``DISCOUNT_FULL_AT``: only its history counts, the
    W-TinyLFU duel that keeps loops and scans out), 0 in the recency regime (``x`` ≤
    ``DISCOUNT_NONE_AT``: the latest hit counts fully, as in LRU), linear in between.
    """
    span = DISCOUNT_FULL_AT - DISCOUNT_NONE_AT
    return min(1.0, max(0.0, (x - DISCOUNT_NONE_AT) / span))


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


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Prefetch
# --------------------------------------------------------------------------------------------

_DIGITS = "0123456789"
_STREAM = 0
_SUCCESSOR = 1


def split_sequence_id(block_id: str) -> tuple[str, int, int] | None:
    """``"conv42/page/7"`` → ``("conv42/page/", 7, 0)``; ``"shard-00003"`` → (…, 3, 5).

    The third item is the zero-padded width (0 when the number is not padded). ``None`` when the
    id does not end with ASCII digits. (``str.rstrip``, not a regular expression: this runs on
    every read.)
    """
    prefix = block_id.rstrip(_DIGITS)
    cut = len(prefix)
    if cut == len(block_id):
        return None
    digits = block_id[cut:]
    width = len(digits) if len(digits) > 1 and digits[0] == "0" else 0
    return prefix, int(digits), width


def format_sequence_id(prefix: str, number: int, width: int) -> str:
    return f"{prefix}{number:0{width}d}" if width else f"{prefix}{number}"


class SequentialPrefetcher:
    """Predicts the next blocks of sequential streams and of learned successor pairs.

    * Streams: ids ending with an integer share a prefix (``conv42/page/``, ``model-x/shard-``).
      When a prefix's number advances by exactly one ``PREFETCH_MIN_RUN`` times in a row, the
      next ``min(depth, run)`` ids are predicted (ramping up like a kernel read-ahead). Any
      other step resets that stream, so random ids never trigger it.
    * Successors: for any id, the id read right after it is remembered with a confidence count
      (a one-slot Misra–Gries counter); once seen ``PREFETCH_MIN_SUCCESSOR_COUNT`` times it is
      predicted. This catches repeated non-numeric orders (layer names of one model).
    * Accuracy feedback: a prediction not read within ``PREFETCH_HORIZON`` accesses counts as
      wrong; each kind (stream, successor) keeps an EWMA of its accuracy and stays silent while
      it is under ``PREFETCH_MIN_ACCURACY`` (it keeps learning, and is retried now and then).

    Returned ids may not exist; the store ignores those it does not hold, and promotes the
    others ahead of the reader (as blocks never read, they are the first to leave again).
    """

    def __init__(self, depth: int = DEFAULT_PREFETCH_DEPTH) -> None:
        self.depth = depth
        #: prefix -> [last number, run length, trusted (a past run reached the minimum)]
        self._streams: OrderedDict[str, list[int]] = OrderedDict()
        #: id -> [successor id, confidence]
        self._successors: OrderedDict[str, list[Any]] = OrderedDict()
        self._previous: str | None = None
        #: predicted id -> (access number when predicted, kind) — oldest first
        self._outstanding: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._accesses = 0
        #: EWMA accuracy per kind (0: stream, 1: successor)
        self.accuracy = [1.0, 1.0]
        self.issued = 0
        self.useful = 0

    def observe(self, block_id: str, now: float) -> Sequence[str]:
        if self.depth <= 0:  # predicting nothing: nothing worth learning either
            return ()
        self._accesses += 1
        if self._outstanding:
            self._score(block_id)
        stream = self._stream(block_id)
        guess = self._successor(block_id)
        self._previous = block_id
        if not stream and guess is None:
            return ()
        predicted: list[str] = []
        if stream and self._trusted(_STREAM):
            predicted.extend(stream)
            for pid in stream:
                self._remember(pid, _STREAM)
        if guess is not None and guess not in predicted and self._trusted(_SUCCESSOR):
            predicted.append(guess)
            self._remember(guess, _SUCCESSOR)
        return predicted

    def _trusted(self, kind: int) -> bool:
        if self.accuracy[kind] >= PREFETCH_MIN_ACCURACY:
            return True
        # Silent, but retried now and then so that a pattern that comes back is picked up again.
        return self._accesses % PREFETCH_RETRY_EVERY == 0

    def _update(self, kind: int, good: bool) -> None:
        target = 1.0 if good else 0.0
        self.accuracy[kind] += PREFETCH_ACCURACY_ALPHA * (target - self.accuracy[kind])

    def _score(self, block_id: str) -> None:
        outstanding = self._outstanding
        hit = outstanding.pop(block_id, None)
        if hit is not None:
            self.useful += 1
            self._update(hit[1], True)
        horizon = self._accesses - PREFETCH_HORIZON
        while outstanding:
            pid, (issued_at, kind) = next(iter(outstanding.items()))
            if issued_at >= horizon and len(outstanding) <= PREFETCH_MAX_OUTSTANDING:
                break
            del outstanding[pid]
            self._update(kind, False)

    def _remember(self, pid: str, kind: int) -> None:
        if pid in self._outstanding:
            return
        self.issued += 1
        self._outstanding[pid] = (self._accesses, kind)

    def _stream(self, block_id: str) -> list[str]:
        # split_sequence_id inlined (this runs on every read); the width only when predicting
        prefix = block_id.rstrip(_DIGITS)
        if len(prefix) == len(block_id):
            return []
        number = int(block_id[len(prefix) :])
        streams = self._streams
        state = streams.get(prefix)
        if state is None:
            streams[prefix] = [number, 0, 0]
            if len(streams) > PREFETCH_MAX_STREAMS:
                streams.popitem(last=False)
            return []
        streams.move_to_end(prefix)
        if number == state[0] + 1:
            state[1] += 1
            if state[1] >= PREFETCH_MIN_RUN:
                state[2] = 1  # this prefix is read sequentially: trust its next restart
        elif number != state[0]:
            if state[1] < PREFETCH_MIN_RUN:
                state[2] = 0
            state[1] = 0
        state[0] = number
        run = state[1]
        if run >= PREFETCH_MIN_RUN:
            ahead = min(self.depth, run)
        elif state[2]:
            ahead = 1
        else:
            return []
        digits = block_id[len(prefix) :]
        width = len(digits) if len(digits) > 1 and digits[0] == "0" else 0
        return [format_sequence_id(prefix, number + k, width) for k in range(1, ahead + 1)]

    def _successor(self, block_id: str) -> str | None:
        """Learn ``previous → block_id`` (a one-slot Misra–Gries counter per id), then return
        the confident successor of ``block_id``, if any."""
        successors = self._successors
        previous = self._previous
        if previous is not None and previous != block_id:
            slot = successors.get(previous)
            if slot is None:
                successors[previous] = [block_id, 1]
                if len(successors) > PREFETCH_MAX_SUCCESSORS:
                    successors.popitem(last=False)
            else:
                successors.move_to_end(previous)
                if slot[0] == block_id:
                    slot[1] += 1
                elif slot[1] > 1:
                    slot[1] -= 1
                else:
                    slot[0], slot[1] = block_id, 1
        mine = successors.get(block_id)
        if mine is None or mine[1] < PREFETCH_MIN_SUCCESSOR_COUNT:
            return None
        return str(mine[0])


class NoPrefetch:
    """Prefetcher that never predicts (baseline)."""

    def observe(self, block_id: str, now: float) -> Sequence[str]:
        return ()


# --------------------------------------------------------------------------------------------
# Promotion / demotion decisions and the bundle the store drives
# --------------------------------------------------------------------------------------------


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


@dataclass(slots=True)
class PolicyBundle:
    """The default memory policy as one object the store drives.

    Store wiring (all under the store's lock, ``now`` from the store's clock):

    * ``put``: ``meta.created = meta.last_access = now``; ``on_put(meta)``; then
      ``placement.place(meta, views, now)`` gives tiers to try in order; before adding to a full
      tier, free ``promotion.bytes_to_free(view, meta.size)`` with
      ``index[tier].victims(need, now)`` and demote those (``index.remove`` each); finally
      ``index[tier].add(meta, now)``.
    * ``get``: ``ids = on_read(meta, now)`` (records the hit, learns, returns prefetch ids);
      ``index[tier].touch(meta, now)``; if the block is not in the fastest tier, for the next
      faster tier ``up``: if ``promotion.should_promote(meta, from_view, up_view, now)``, free
      room in ``up`` as above, but only from blocks colder than this one, and move it
      (``remove`` from the old index, ``add`` to the new) if it then fits under ``up``'s high
      watermark.
      Then promote the prefetch ids the store holds below the fastest tier, adding each with
      ``index[up].add(meta, now, prefetched=True)`` (it waits for its read in the index's
      *ahead* segment, evicted last; a plain ``add`` treats it as read now).
    * Eviction cycle (pressure or periodic): ``victims(promotion.bytes_to_free(view), now)``;
      ``remove`` each block really moved (that is how the index learns its ghosts: a ``remove``
      of a block the last ``victims`` returned counts as an eviction).
    * Pin, unpin, priority change: set the field, then ``index.touch(meta, now)`` re-keys it
      (victims skip pinned blocks and blocks with ``readers > 0`` anyway).
    * Index per tier: ``new_index(reload_latency=<latency of the next slower tier>,
      tier=<name of the next slower tier>)`` — the tier a block evicted from this one is
      reloaded from, whose learned cost then applies.
    * Measured moves: ``costs.observe(source_tier, size, seconds)`` for a move out of
      ``source_tier`` (learned reload cost of that tier).
    """

    config: PolicyConfig
    hotness: DecayedHotness
    placement: OrchestratorStrategy
    prefetcher: SequentialPrefetcher
    promotion: PromotionPolicy
    costs: ReloadCostModel
    #: A hotness model from configuration (``memory.hotness_model``): it is told every hit and
    #: its score decides promotions, warmup, compression and spill; the eviction indexes keep
    #: ranking by ``hotness``. None: ``hotness`` does both.
    scorer: HotnessModel | None = None

    def new_index(
        self, reload_latency: float = DEFAULT_RELOAD_LATENCY, tier: str | None = None
    ) -> HotnessIndex:
        """An eviction index for one tier; ``reload_latency`` and ``tier``: the next slower tier
        (where evicted blocks go and are reloaded from)."""
        return HotnessIndex(
            self.hotness,
            reload_latency=reload_latency,
            reload_tier=tier,
            costs=self.costs,
            window_fraction=self.config.window_fraction,
            adaptive=self.config.adaptive_ranking,
        )

    def on_put(self, block: BlockMeta) -> None:
        """A block was written (before placement): a placement that learns from writes
        (``observe_put``, as :class:`HotnessPlacement`) learns the hint's write count; a
        strategy with only ``place`` is left alone."""
        observe = getattr(self.placement, "observe_put", None)
        if observe is not None:
            observe(block)

    def on_read(self, block: BlockMeta, now: float) -> Sequence[str]:
        """A block is read: record the hit, learn, and return ids worth promoting ahead."""
        if block.hits <= 0.0:
            observe = getattr(self.placement, "observe_first_read", None)
            if observe is not None:
                observe(block)
        self.hotness.record_hit(block, now)
        if self.scorer is not None:
            self.scorer.record_hit(block, now)
        return self.prefetcher.observe(block.id, now)

    def should_promote(
        self, block: BlockMeta, from_tier: TierView | str, to_tier: TierView, now: float
    ) -> bool:
        return self.promotion.should_promote(block, from_tier, to_tier, now)


def default_policy(settings: object | None = None) -> PolicyBundle:
    """The default policy, configured from a :class:`PolicyConfig`, or from ``MemorySettings``
    (or any object with the same
    attribute names; missing ones keep their defaults): ``half_life_s``, ``promote_threshold``,
    ``pressure_high``, ``pressure_low``, and the
    optional ``policy_window_fraction``, ``policy_adaptive_ranking``, ``reload_unit_bytes``,
    ``prefetch_depth``."""
    config = settings if isinstance(settings, PolicyConfig) else policy_config_from(settings)
    hotness = DecayedHotness(config.half_life_s)
    return PolicyBundle(
        config=config,
        hotness=hotness,
        placement=HotnessPlacement(config.pressure_high),
        prefetcher=SequentialPrefetcher(config.prefetch_depth),
        promotion=PromotionPolicy(hotness, config),
        costs=ReloadCostModel(config.reload_unit_bytes),
    )


_SETTING_NAMES = {
    "half_life_s": "half_life_s",
    "promote_threshold": "promote_threshold",
    "pressure_high": "pressure_high",
    "pressure_low": "pressure_low",
    "window_fraction": "policy_window_fraction",
    "adaptive_ranking": "policy_adaptive_ranking",
    "reload_unit_bytes": "reload_unit_bytes",
    "prefetch_depth": "prefetch_depth",
}


def policy_config_from(settings: object | None, **overrides: Any) -> PolicyConfig:
    """Build a :class:`PolicyConfig` from settings attributes, then keyword overrides."""
    values: dict[str, Any] = {}
    if settings is not None:
        for name, attr in _SETTING_NAMES.items():
            value = getattr(settings, attr, None)
            if value is not None:
                values[name] = value
    values.update(overrides)
    return PolicyConfig(**values)


def total_size(blocks: Iterable[BlockMeta]) -> int:
    return sum(b.size for b in blocks)

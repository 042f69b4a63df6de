"""The default memory policy, wired: :class:`PolicyConfig` and :class:`PolicyBundle`.

The store (``memory/store.py``) and the policy benchmark (``bench/memory/policy.py``) drive these
same objects. No I/O, no locks, no clock reads: ``now`` (monotonic seconds) is always passed in,
and the store calls everything here under its own lock.

The default policy, in one paragraph. A block's hotness is its hit count decayed with a
half-life (60 s by default): recent hits weigh more, old ones fade, so the count is LFU and LRU
at once (``hotness.py``). Each tier keeps a :class:`HotnessIndex` (``eviction_index.py``): a
small recency *window* (1 % of the tier, in LRU order) in front of a *main* region ordered by
``(coldness × size) / (reload_cost + priority)`` (``reload_cost.py``). Because every count decays
at the same rate, the order of decayed counts never changes with time, so main is a heap keyed by
a time-invariant number and is never re-scored. A block leaving the window takes a place in main
only if its history (its hits before the latest) beats main's coldest block — the admission duel
of W-TinyLFU (``admission.py``) — which keeps loops and scans from washing the tier out. How fast
the ranking forgets (LFU-like or LRU-like) is learned per tier from ghost hits, as ARC does
(``ranking.py``). Placement learns, per hint, how often a written block is read again
(``placement.py``); a :class:`SequentialPrefetcher` recognises ``…/7`` then ``…/8`` (and learned
successor pairs) and names the next blocks so the store promotes them ahead of the reader
(``prefetch.py``); ``promotion.py`` says when a block read below moves up.

The names of those modules are re-exported here: tests, benchmarks and configuration name them as
``vramancer.memory.policy.X``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vramancer.errors import InvalidInput
from vramancer.memory.admission import DEFAULT_WINDOW_FRACTION
from vramancer.memory.eviction_index import (
    DEFAULT_RELOAD_LATENCY,
    EvictionIndex,
    HotnessIndex,
    LruIndex,
)
from vramancer.memory.hotness import (
    DEFAULT_HALF_LIFE_S,
    NEVER_READ_LOG2,
    DecayedHotness,
    HotnessModel,
)
from vramancer.memory.placement import FastestFirstStrategy, HotnessPlacement, OrchestratorStrategy
from vramancer.memory.prefetch import (
    DEFAULT_PREFETCH_DEPTH,
    NoPrefetch,
    SequentialPrefetcher,
    format_sequence_id,
    split_sequence_id,
)
from vramancer.memory.promotion import DEFAULT_PROMOTE_THRESHOLD, PromotionPolicy, bytes_to_free
from vramancer.memory.ranking import GHOST_GAIN_FROM, GHOST_RECENCY_GAIN
from vramancer.memory.records import BlockMeta, TierView
from vramancer.memory.reload_cost import DEFAULT_RELOAD_UNIT_BYTES, ReloadCostModel

__all__ = [
    "DEFAULT_HALF_LIFE_S",
    "DEFAULT_PREFETCH_DEPTH",
    "DEFAULT_PROMOTE_THRESHOLD",
    "DEFAULT_RELOAD_LATENCY",
    "DEFAULT_RELOAD_UNIT_BYTES",
    "DEFAULT_WINDOW_FRACTION",
    "GHOST_GAIN_FROM",
    "GHOST_RECENCY_GAIN",
    "NEVER_READ_LOG2",
    "BlockMeta",
    "DecayedHotness",
    "EvictionIndex",
    "FastestFirstStrategy",
    "HotnessIndex",
    "HotnessModel",
    "HotnessPlacement",
    "LruIndex",
    "NoPrefetch",
    "OrchestratorStrategy",
    "PolicyBundle",
    "PolicyConfig",
    "PromotionPolicy",
    "ReloadCostModel",
    "SequentialPrefetcher",
    "StorePolicy",
    "TierView",
    "bytes_to_free",
    "default_policy",
    "format_sequence_id",
    "policy_config_from",
    "split_sequence_id",
]


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


class StorePolicy(Protocol):
    """What the store needs from a policy (:class:`PolicyBundle` is the default)."""

    @property
    def hotness(self) -> HotnessModel: ...

    @property
    def placement(self) -> OrchestratorStrategy: ...

    def new_index(self, reload_latency: float, tier: str | None) -> EvictionIndex: ...

    def on_put(self, block: BlockMeta) -> None: ...

    def on_read(self, block: BlockMeta, now: float) -> Sequence[str]: ...

    def should_promote(
        self, block: BlockMeta, from_tier: TierView | str, to_tier: TierView, now: float
    ) -> bool: ...


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

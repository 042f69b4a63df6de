"""Memory policy: hotness, promotion thresholds, eviction order, placement, prefetch.

Exact orders and exact numbers over a ManualClock; the index is driven through the same calls
the store makes (add, touch, victims, remove).
"""

from __future__ import annotations

import math

import pytest

from vramancer.clock import ManualClock
from vramancer.errors import InvalidInput
from vramancer.memory.policy import (
    GHOST_GAIN_FROM,
    GHOST_RECENCY_GAIN,
    NEVER_READ_LOG2,
    BlockMeta,
    DecayedHotness,
    FastestFirstStrategy,
    HotnessIndex,
    HotnessPlacement,
    LruIndex,
    NoPrefetch,
    PolicyConfig,
    PromotionPolicy,
    ReloadCostModel,
    SequentialPrefetcher,
    TierView,
    bytes_to_free,
    default_policy,
    format_sequence_id,
    policy_config_from,
    split_sequence_id,
)
from vramancer.memory.settings import MemorySettings


def block(
    block_id: str,
    size: int = 100,
    *,
    now: float = 0.0,
    priority: int = 0,
    pinned: bool = False,
) -> BlockMeta:
    return BlockMeta(
        id=block_id,
        size=size,
        tier="L4",
        priority=priority,
        pinned=pinned,
        created=now,
        last_access=now,
    )


def view(name: str, latency: float, capacity: int, used: int = 0) -> TierView:
    return TierView(name=name, latency=latency, capacity_bytes=capacity, used_bytes=used)


# ------------------------------------------------------------------------------------ hotness


def test_hits_halve_every_half_life_and_add_one_per_hit() -> None:
    clock = ManualClock(start=0.0)
    hot = DecayedHotness(half_life_s=60.0)
    b = block("a")
    assert hot.score(b, clock.monotonic()) == 0.0
    hot.record_hit(b, clock.monotonic())
    assert b.hits == 1.0 and b.last_access == 0.0
    clock.advance(60.0)
    assert hot.score(b, clock.monotonic()) == pytest.approx(0.5)
    hot.record_hit(b, clock.monotonic())
    assert b.hits == pytest.approx(1.5)
    assert hot.history(b, clock.monotonic()) == pytest.approx(0.5)
    clock.advance(120.0)
    assert hot.score(b, clock.monotonic()) == pytest.approx(1.5 / 4)


def test_log_key_orders_blocks_like_their_scores_at_any_later_time() -> None:
    hot = DecayedHotness(half_life_s=10.0)
    blocks = []
    for i, (hits, t) in enumerate([(1, 0.0), (5, 3.0), (2, 30.0), (9, 1.0), (1, 40.0)]):
        b = block(f"b{i}", now=t)
        for _ in range(hits):
            hot.record_hit(b, t)
        blocks.append(b)
    by_key = [b.id for b in sorted(blocks, key=hot.log_key)]
    for now in (40.0, 55.5, 100.0, 1000.0):
        assert [b.id for b in sorted(blocks, key=lambda b: hot.score(b, now))] == by_key
        for b in blocks:
            assert hot.log_key(b) - now / 10.0 == pytest.approx(math.log2(hot.score(b, now)))


def test_a_block_never_read_ranks_below_one_read_within_thirty_half_lives() -> None:
    hot = DecayedHotness(half_life_s=1.0)
    written = block("w", now=100.0)
    read = block("r", now=71.0)
    hot.record_hit(read, 71.0)
    assert hot.log_key(written) == NEVER_READ_LOG2 + 100.0
    assert hot.log_key(written) < hot.log_key(read)


def test_half_life_must_be_positive() -> None:
    with pytest.raises(InvalidInput):
        DecayedHotness(0.0)
    with pytest.raises(InvalidInput):
        PolicyConfig(half_life_s=-1.0)
    with pytest.raises(InvalidInput):
        PolicyConfig(pressure_low=0.95, pressure_high=0.9)


# ---------------------------------------------------------------------------------- promotion


def test_promotion_threshold_over_a_manual_clock() -> None:
    clock = ManualClock(start=0.0)
    config = PolicyConfig(promote_threshold=2.0)
    hot = DecayedHotness(config.half_life_s)
    policy = PromotionPolicy(hot, config)
    full = view("L1", 1.0, 1000, used=1000)
    b = block("a")
    hot.record_hit(b, clock.monotonic())
    assert not policy.should_promote(b, "L4", full, clock.monotonic())  # 1.0 < 2.0
    clock.advance(60.0)
    hot.record_hit(b, clock.monotonic())  # 0.5 + 1 = 1.5
    assert not policy.should_promote(b, "L4", full, clock.monotonic())
    hot.record_hit(b, clock.monotonic())  # 2.5
    assert policy.should_promote(b, "L4", full, clock.monotonic())
    clock.advance(60.0)  # 1.25: cooled below the threshold again
    assert not policy.should_promote(b, "L4", full, clock.monotonic())


def test_promotion_into_free_room_needs_no_heat_but_pinned_and_oversized_never_move() -> None:
    config = PolicyConfig(promote_threshold=5.0)
    policy = PromotionPolicy(DecayedHotness(), config)
    roomy = view("L1", 1.0, 1000, used=100)
    assert policy.should_promote(block("cold"), "L4", roomy, 0.0)
    assert not policy.should_promote(block("pinned", pinned=True), "L4", roomy, 0.0)
    assert not policy.should_promote(block("big", size=2000), "L4", roomy, 0.0)
    # Free room but above the high watermark: the threshold applies.
    busy = view("L1", 1.0, 1000, used=950)
    assert not policy.should_promote(block("cold"), "L4", busy, 0.0)


def test_promotion_into_free_room_stays_under_the_tier_s_high_mark() -> None:
    policy = PromotionPolicy(DecayedHotness(), PolicyConfig(promote_threshold=5.0))
    b = block("a", 100)
    assert policy.should_promote(b, "L4", view("L1", 1.0, 1000, used=800), 0.0)  # 900 ≤ 900
    assert not policy.should_promote(b, "L4", view("L1", 1.0, 1000, used=801), 0.0)
    own_marks = TierView("L1", 1.0, 1000, 801, pressure_high=0.95, pressure_low=0.5)
    assert policy.should_promote(b, "L4", own_marks, 0.0)
    assert policy.bytes_to_free(own_marks, incoming_bytes=200) == 501  # down to its own 0.5


def test_promotion_policy_has_no_demotion_threshold() -> None:
    # Demotion is the eviction cycle's (index order, down to the low mark) and compress_cold's
    # (memory.cold_threshold): no second, threshold-based demotion.
    assert not hasattr(PromotionPolicy, "should_demote")
    assert not hasattr(PolicyConfig(), "demote_threshold")


def test_bytes_to_free_goes_down_to_the_low_watermark_once_above_the_high_one() -> None:
    policy = PromotionPolicy(DecayedHotness(), PolicyConfig(pressure_high=0.9, pressure_low=0.75))
    assert policy.bytes_to_free(view("L4", 5.0, 1000, used=800)) == 0
    assert policy.bytes_to_free(view("L4", 5.0, 1000, used=800), incoming_bytes=50) == 0
    assert policy.bytes_to_free(view("L4", 5.0, 1000, used=800), incoming_bytes=150) == 200
    assert policy.bytes_to_free(view("L4", 5.0, 1000, used=950)) == 200
    exact = PromotionPolicy(DecayedHotness(), PolicyConfig(pressure_high=1.0, pressure_low=1.0))
    assert exact.bytes_to_free(view("F", 1.0, 1000, used=1000), incoming_bytes=30) == 30


# ------------------------------------------------------------------------------ eviction index


def fixed_index(hot: DecayedHotness, **kwargs: object) -> HotnessIndex:
    return HotnessIndex(hot, adaptive=False, **kwargs)  # type: ignore[arg-type]


def test_victims_in_exact_order_of_coldness_size_and_priority() -> None:
    hot = DecayedHotness(60.0)
    index = fixed_index(hot, reload_latency=16.0)
    now = 1000.0
    spec = {
        # id: (size, priority, hits, last access)
        "warm": (100, 0, 4, 990.0),
        "cold": (100, 0, 1, 900.0),
        "cold-big": (400, 0, 1, 900.0),
        "cold-prio": (100, 5, 1, 900.0),
        "stale": (100, 0, 8, 500.0),
        "hot": (100, 0, 8, 999.0),  # last added: it stays in the window, which goes last
    }
    blocks = {}
    for bid, (size, prio, hits, t) in spec.items():
        b = block(bid, size, now=t, priority=prio)
        for _ in range(hits):
            hot.record_hit(b, t)
        index.add(b, now)
        blocks[bid] = b
    for b in blocks.values():
        index.touch(b, now)  # those in main take their full value
    assert [index.segment_of(b) for b in blocks.values()] == ["main"] * 5 + ["window"]
    order = [b.id for b in index.victims(10_000, now)]
    # value = hotness × (reload + priority) / size, lowest first (reload ≈ 16 here):
    # stale 8·2^(-500/60) = 0.025 → 0.004/B; cold-big 2^(-100/60)/400 → 0.013/B;
    # cold → 0.050; cold-prio (16 + 5) → 0.066; warm 4·2^(-10/60) → 0.57; hot (window) last.
    assert order == ["stale", "cold-big", "cold", "cold-prio", "warm", "hot"]
    assert len(index) == 6  # victims() does not change membership
    assert [b.id for b in index.victims(150, now)] == ["stale", "cold-big"]
    assert [b.id for b in index.victims(100, now)] == ["stale"]


def test_pinned_and_read_blocks_are_never_victims_and_fewer_come_back_when_impossible() -> None:
    hot = DecayedHotness()
    index = fixed_index(hot)
    a, b, c = block("a"), block("b"), block("c")
    for x in (a, b, c):
        index.add(x, 0.0)
    a.pinned = True
    b.readers = 2
    assert [v.id for v in index.victims(300, 1.0)] == ["c"]
    b.readers = 0
    assert sorted(v.id for v in index.victims(300, 1.0)) == ["b", "c"]
    assert index.victims(0, 1.0) == []


def test_remove_touch_and_membership_bookkeeping() -> None:
    hot = DecayedHotness()
    index = fixed_index(hot)
    blocks = [block(f"b{i}", 10 + i) for i in range(50)]
    for i, b in enumerate(blocks):
        index.add(b, float(i))
    assert len(index) == 50 and index.bytes == sum(b.size for b in blocks)
    for b in blocks[::3]:
        hot.record_hit(b, 60.0)
        index.touch(b, 60.0)
    for b in blocks[::2]:
        index.remove(b)
        assert b.index_slot is None and b not in index
    index.remove(blocks[0])  # twice: ignored
    kept = blocks[1::2]
    assert len(index) == len(kept)
    assert index.bytes == sum(b.size for b in kept)
    assert {b.id for b in index.blocks()} == {b.id for b in kept}
    assert {v.id for v in index.victims(10**9, 61.0)} == {b.id for b in kept}


def test_a_loop_slightly_larger_than_the_tier_keeps_most_of_it_resident() -> None:
    """LRU gets no hit at all on a loop of 12 blocks through 10 slots; the duel at the window's
    exit keeps incumbents, so most of the loop stays and hits."""
    hot = DecayedHotness(60.0)
    index = fixed_index(hot, window_fraction=0.1)
    resident: dict[str, BlockMeta] = {}
    metas = {f"k{i}": block(f"k{i}", 1) for i in range(12)}
    hits = 0
    now = 0.0
    for step in range(12 * 40):
        now += 0.1
        b = metas[f"k{step % 12}"]
        if b.hits > 0 or b.id in resident:
            hot.record_hit(b, now)
        if b.id in resident:
            hits += 1 if step >= 12 * 20 else 0
            index.touch(b, now)
            continue
        if len(resident) >= 10:
            for v in index.victims(1, now):
                index.remove(v)
                del resident[v.id]
        index.add(b, now)
        resident[b.id] = b
    assert hits >= 0.6 * 12 * 20


def test_compaction_keeps_the_heap_consistent() -> None:
    hot = DecayedHotness(1.0)
    index = fixed_index(hot)
    blocks = [block(f"b{i}", 8) for i in range(200)]
    for b in blocks:
        index.add(b, 0.0)
    now = 0.0
    for _ in range(20):  # thousands of dead entries: compaction runs
        for b in blocks:
            now += 0.01
            hot.record_hit(b, now)
            index.touch(b, now)
    assert len(index) == 200
    order = index.victims(8 * 200, now)
    assert len(order) == 200 and len({b.id for b in order}) == 200
    keys = [index.value_log(b) for b in order if index.segment_of(b) == "main"]
    assert keys == sorted(keys)


def test_prefetched_blocks_wait_for_their_read_and_go_last() -> None:
    hot = DecayedHotness(60.0)
    index = fixed_index(hot)
    blocks = [block(f"b{i}", 10, now=0.0) for i in range(20)]
    for b in blocks:
        hot.record_hit(b, 0.0)
        hot.record_hit(b, 0.0)  # read twice: a history to keep in main
        index.add(b, 0.0)
    ahead = block("ahead", 10, now=0.0)
    index.add(ahead, 30.0, prefetched=True)
    assert index.segment_of(ahead) == "ahead"
    order = [v.id for v in index.victims(10 * 21, 30.0)]
    assert order[-1] == "ahead" and len(order) == 21  # after main and the window
    hot.record_hit(ahead, 31.0)
    index.touch(ahead, 31.0)  # the predicted read came
    assert index.segment_of(ahead) == "window"
    # Unread prefetches beyond PREFETCH_SHARE (10 % of the bytes) join main, oldest first.
    extra = [block(f"p{i}", 10, now=0.0) for i in range(5)]
    for p in extra:
        index.add(p, 40.0, prefetched=True)
    assert [index.segment_of(p) for p in extra] == ["main", "main", "main", "ahead", "ahead"]
    assert [v.id for v in index.victims(30, 40.0)] == ["p0", "p1", "p2"]  # never read: first


def test_ghosts_of_seen_once_blocks_lean_the_ranking_towards_recency() -> None:
    hot = DecayedHotness(60.0)
    index = HotnessIndex(hot)
    start = index.ranking_half_life_s
    now = 0.0
    blocks = [block(f"b{i}", 1) for i in range(64)]
    for b in blocks:
        index.add(b, now)
    for _ in range(3):
        for _b in blocks:  # evict one (seen once) and bring it back: an LRU would have hit
            now += 0.1
            for v in index.victims(1, now):
                index.remove(v)
                index.add(v, now)
    assert index.recency_weight > 0.5
    assert index.ranking_half_life_s < start / 4


def _ghost_round_trip(index: HotnessIndex, now: float, hits: float) -> None:
    """Evict the index's next victim with ``hits`` on it and bring it straight back."""
    (victim,) = index.victims(1, now)
    victim.hits = hits
    index.remove(victim)
    index.add(victim, now)


def test_a_ghost_hit_moves_the_weight_faster_near_the_recency_end_only() -> None:
    # 64 blocks: ARC's step is 1/64 per ghost hit (no ghosts on the other side).
    lean = HotnessIndex(DecayedHotness(60.0), recency_factor=1.0)  # x = 0: weight 6/16
    assert lean.recency_weight == 0.375 < GHOST_GAIN_FROM
    for i in range(64):
        lean.add(block(f"b{i}", 1), 0.0)
    _ghost_round_trip(lean, 1.0, hits=1.0)  # seen once: towards recency, ARC's own step
    assert lean.recency_weight == 0.375 + 1 / 64
    # At the recency end (x = -10, weight 1) a seen-more ghost moves it 1 + gain times as far.
    recent = HotnessIndex(DecayedHotness(60.0), recency_factor=2.0**-10)
    assert recent.recency_weight == 1.0
    for i in range(64):
        recent.add(block(f"r{i}", 1), 0.0)
    _ghost_round_trip(recent, 1.0, hits=4.0)
    assert recent.recency_weight == pytest.approx(1.0 - (1 + GHOST_RECENCY_GAIN) / 64)
    assert recent.ranking_half_life_s > 60.0 * 2.0**-10


def test_lru_index_baseline_order() -> None:
    index = LruIndex()
    a, b, c = block("a"), block("b"), block("c")
    for x in (a, b, c):
        index.add(x, 0.0)
    index.touch(a, 1.0)
    assert [v.id for v in index.victims(200, 2.0)] == ["b", "c"]
    index.remove(b)
    assert len(index) == 2


# ---------------------------------------------------------------------------------- placement


def test_placement_by_size_and_fastest_first() -> None:
    tiers = [view("L5", 16.0, 10_000), view("L1", 1.0, 500), view("L4", 5.0, 2000)]
    placement = HotnessPlacement()
    assert list(placement.place(block("small", 100), tiers, 0.0)) == ["L1", "L4", "L5"]
    assert list(placement.place(block("mid", 1000), tiers, 0.0)) == ["L4", "L5"]
    assert list(placement.place(block("huge", 50_000), tiers, 0.0)) == []
    assert list(FastestFirstStrategy().place(block("mid", 1000), tiers, 0.0)) == ["L4", "L5"]


def test_placement_learns_a_hint_that_is_never_read_again() -> None:
    placement = HotnessPlacement(pressure_high=0.9)
    tiers = [view("L1", 1.0, 1000, used=950), view("L4", 5.0, 10_000, used=100)]
    for i in range(100):
        written = block(f"scan{i}")
        written.hint = "scan"
        placement.observe_put(written)
    for i in range(100):
        kv = block(f"kv{i}")
        kv.hint = "kv"
        placement.observe_put(kv)
        placement.observe_first_read(kv)
    scan = block("scan-next")
    scan.hint = "scan"
    kv = block("kv-next")
    kv.hint = "kv"
    assert placement.predicted_reread("scan") == 0.0
    assert placement.predicted_reread("kv") is not None
    assert placement.predicted_reread("kv") > 0.9  # type: ignore[operator]
    assert placement.predicted_reread("unknown") is None
    assert list(placement.place(scan, tiers, 0.0)) == ["L4"]  # L1 is under pressure
    assert list(placement.place(kv, tiers, 0.0)) == ["L1", "L4"]
    scan.priority = 3
    assert list(placement.place(scan, tiers, 0.0)) == ["L1", "L4"]


# ----------------------------------------------------------------------------------- prefetch


def test_sequence_ids_parse_and_format() -> None:
    assert split_sequence_id("conv42/page/7") == ("conv42/page/", 7, 0)
    assert split_sequence_id("model-x/shard-00003") == ("model-x/shard-", 3, 5)
    assert split_sequence_id("plain") is None
    assert format_sequence_id("model-x/shard-", 4, 5) == "model-x/shard-00004"
    assert format_sequence_id("conv42/page/", 10, 0) == "conv42/page/10"


def test_prefetcher_predicts_the_next_pages_of_a_stream_ramping_up() -> None:
    p = SequentialPrefetcher(depth=4)
    assert list(p.observe("conv42/page/5", 0.0)) == []
    assert list(p.observe("conv42/page/6", 0.0)) == []
    assert list(p.observe("conv42/page/7", 0.0)) == ["conv42/page/8", "conv42/page/9"]
    assert list(p.observe("conv42/page/8", 0.0)) == [
        "conv42/page/9",
        "conv42/page/10",
        "conv42/page/11",
    ]
    assert list(p.observe("conv42/page/9", 0.0))[-1] == "conv42/page/13"  # depth 4


def test_prefetcher_interleaved_streams_padding_and_trusted_restart() -> None:
    p = SequentialPrefetcher(depth=2)
    out = []
    for i in range(3):
        p.observe(f"a/shard-{i:05d}", 0.0)
        out = list(p.observe(f"b/{i}", 0.0))
    assert out == ["b/3", "b/4"]
    assert list(p.observe("a/shard-00003", 0.0)) == ["a/shard-00004", "a/shard-00005"]
    # A stream read sequentially before is trusted from its restart on.
    assert list(p.observe("b/0", 0.0)) == ["b/1"]


def test_prefetcher_stays_silent_on_random_ids() -> None:
    import random

    rng = random.Random(7)
    p = SequentialPrefetcher()
    predicted = 0
    for _ in range(5000):
        predicted += len(p.observe(f"obj/{rng.randrange(100_000)}", 0.0))
    assert predicted == 0


def test_prefetcher_learns_repeated_successors_of_opaque_ids() -> None:
    p = SequentialPrefetcher()
    order = ["embed", "attn", "mlp", "head"]
    seen: list[list[str]] = []
    for _ in range(3):
        seen = [list(p.observe(name, 0.0)) for name in order]
    assert seen == [["attn"], ["mlp"], ["head"], ["embed"]]
    assert p.useful == 3  # the last guess ("embed") is still open


def test_prefetcher_accuracy_feedback_silences_wrong_guesses() -> None:
    """Runs of three pages that always stop there: every read-ahead is wasted, so the stream
    predictor falls silent (but for a retry now and then)."""
    p = SequentialPrefetcher()
    issued_late = 0
    for run in range(300):
        for page in range(3):
            issued = len(p.observe(f"conv{run}/page/{page}", 0.0))
            if run >= 150:
                issued_late += issued
        for j in range(70):  # other reads, past the horizon
            p.observe(f"other-{run}-{j}z", 0.0)
    assert p.accuracy[0] < 0.25
    assert issued_late <= 10  # 150 runs would have issued 300 ids without the feedback
    assert list(NoPrefetch().observe("x", 0.0)) == []


# ------------------------------------------------------------------------------ reload costs


def test_reload_cost_static_and_learned() -> None:
    costs = ReloadCostModel(unit_bytes=1000)
    assert costs.cost(0, 16.0) == 16.0
    assert costs.cost(3000, 16.0) == 64.0
    assert costs.cost(3000, 16.0, "L5") == 64.0  # nothing learned yet
    for _ in range(10):
        costs.observe("L5", 1000, 0.002)  # 2 ms for a unit block
    # Learned: a unit block costs 2 × latency, other sizes scale as the measurements do.
    assert costs.cost(1000, 16.0, "L5") == pytest.approx(32.0)
    assert costs.cost(0, 16.0, "L5") == pytest.approx(16.0)
    assert costs.cost(3000, 16.0, "L5") == pytest.approx(64.0)


# ------------------------------------------------------------------------------------ bundle


def test_default_policy_reads_memory_settings() -> None:
    settings = MemorySettings(half_life_s=30.0, promote_threshold=3.0, cold_threshold=0.1)
    bundle = default_policy(settings)
    assert bundle.hotness.half_life_s == 30.0
    assert bundle.config.promote_threshold == 3.0
    assert bundle.config.pressure_high == settings.pressure_high
    config = policy_config_from(settings, prefetch_depth=0)
    assert default_policy(config).prefetcher.depth == 0
    assert default_policy().config == PolicyConfig()


def test_bundle_on_read_records_the_hit_learns_the_hint_and_returns_prefetch_ids() -> None:
    bundle = default_policy()
    metas = [block(f"m/shard-{i:03d}") for i in range(4)]
    for m in metas:
        m.hint = "weights"
        bundle.on_put(m)
    ahead: list[str] = []
    for i, m in enumerate(metas[:3]):
        ahead = list(bundle.on_read(m, float(i)))
        assert m.hits == 1.0 and m.last_access == float(i)
    assert ahead == ["m/shard-003", "m/shard-004"]
    index = bundle.new_index(reload_latency=16.0, tier="L5")
    assert isinstance(index, HotnessIndex)


def test_block_meta_is_slotted() -> None:
    assert not hasattr(block("a"), "__dict__")


# ------------------------------------------------------------------------ hit path (lazy keys)


class EagerIndex(HotnessIndex):
    """Reference: re-keys a block in main on every hit (a new heap entry; the old one dies)."""

    def touch(self, block: BlockMeta, now: float) -> None:
        if self.segment_of(block) == "main":
            self._push(block, self.value_log(block))
        else:
            super().touch(block, now)


def test_a_hit_in_main_adds_no_heap_entry_and_victims_keep_the_eager_order() -> None:
    """``touch`` of a block in main only marks it dirty (O(1) on the hit path); its entry gets
    the block's current value when it reaches the top. With the ranking decaying as fast as
    the hotness (x = 0), the victims come in exactly the order an eager re-key gives."""
    import random

    rng = random.Random(3)
    lazy_hot, eager_hot = DecayedHotness(30.0), DecayedHotness(30.0)
    lazy = fixed_index(lazy_hot, window_fraction=0.05)
    eager = EagerIndex(eager_hot, adaptive=False, window_fraction=0.05)
    mine = [block(f"b{i}", 10 + i % 7) for i in range(400)]
    ref = [block(f"b{i}", 10 + i % 7) for i in range(400)]
    now = 0.0
    for a, b in zip(mine, ref, strict=True):
        now += 0.05
        lazy.add(a, now)
        eager.add(b, now)
    entries = lazy.heap_entries
    for step in range(6000):
        now += 0.05
        k = min(int(rng.paretovariate(1.2)) - 1, 399)
        for hot, index, blocks in ((lazy_hot, lazy, mine), (eager_hot, eager, ref)):
            hot.record_hit(blocks[k], now)
            index.touch(blocks[k], now)
        if step % 1000 == 999:  # an eviction cycle now and then: both pick the same victims
            for index in (lazy, eager):
                for v in index.victims(200, now):
                    index.remove(v)
                    index.add(v, now)
            assert [v.id for v in lazy.victims(500, now)] == [v.id for v in eager.victims(500, now)]
    assert sum(1 for b in mine if lazy.segment_of(b) == "main") > 300
    before = (lazy.heap_entries, eager.heap_entries)
    for i in range(300):  # hits on blocks in main only: no new entry in the lazy heap
        now += 0.05
        a, b = mine[i], ref[i]
        if lazy.segment_of(a) == "main" and eager.segment_of(b) == "main":
            lazy_hot.record_hit(a, now)
            eager_hot.record_hit(b, now)
            lazy.touch(a, now)
            eager.touch(b, now)
    assert lazy.heap_entries == before[0]
    assert eager.heap_entries > before[1] + 200
    assert entries <= before[0]
    assert [v.id for v in lazy.victims(10**9, now)] == [v.id for v in eager.victims(10**9, now)]


def test_removals_compact_the_heap_and_dirty_blocks_survive_the_rebuild() -> None:
    hot = DecayedHotness(10.0)
    index = fixed_index(hot)
    blocks = [block(f"c{i}", 4) for i in range(6000)]
    for b in blocks:
        index.add(b, 0.0)
    for b in blocks[:100]:  # dirty: hit after entering main
        hot.record_hit(b, 1.0)
        index.touch(b, 1.0)
    for b in blocks[2500:]:
        index.remove(b)
    assert len(index) == 2500
    assert index.heap_entries < 2 * 2500  # rebuilt when the dead outnumbered the live (5940)
    assert {b.id for b in index.blocks()} == {b.id for b in blocks[:2500]}
    order = index.victims(10**9, 2.0)
    assert {b.id for b in order} == {b.id for b in blocks[:2500]}
    read = {b.id for b in blocks[:100]}
    assert {b.id for b in order[-100:]} == read  # the read ones last (the window is empty)


def test_sequence_id_parsing_edge_cases() -> None:
    assert split_sequence_id("a1b2") == ("a1b", 2, 0)
    assert split_sequence_id("007") == ("", 7, 3)
    assert split_sequence_id("x0") == ("x", 0, 0)
    assert split_sequence_id("x00") == ("x", 0, 2)
    assert split_sequence_id("page/\u0663") is None  # ASCII digits only
    assert split_sequence_id("") is None


def test_a_prefetcher_of_depth_zero_predicts_and_learns_nothing() -> None:
    p = SequentialPrefetcher(depth=0)
    for _ in range(3):
        for i in range(5):
            assert list(p.observe(f"s/{i}", 0.0)) == []
    assert p.issued == 0 and not p._streams and not p._successors


def test_bytes_to_free_with_a_tier_s_own_marks_and_forced() -> None:
    assert bytes_to_free(800, 1000, 0, 0.9, 0.75) == 0
    assert bytes_to_free(800, 1000, 0, 0.9, 0.75, force=True) == 50
    assert bytes_to_free(800, 1000, 0, 0.7, 0.5) == 300  # a tier with lower marks
    assert bytes_to_free(0, 0, 10, 0.9, 0.75) == 10  # no budget: only what must fit

"""The store drives the default policy as ``PolicyBundle`` documents it.

A recording policy wraps the real default policy and logs what the store asks of each tier's
eviction index: which tier an index reloads from, ``add`` (plain or prefetched), ``touch``
and ``remove``; reload costs are learned from moves up only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.memory.policy import (
    BlockMeta,
    HotnessIndex,
    PolicyBundle,
    ReloadCostModel,
    TierView,
    default_policy,
)

KIB = 1024


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class RecordingIndex:
    """The real index of one tier, with a log of the calls the store makes."""

    def __init__(self, inner: HotnessIndex, log: list[tuple[str, str, bool]]) -> None:
        self.inner = inner
        self.log = log

    def add(self, block: BlockMeta, now: float, *, prefetched: bool = False) -> None:
        self.log.append(("add", block.id, prefetched))
        self.inner.add(block, now, prefetched=prefetched)

    def remove(self, block: BlockMeta) -> None:
        self.log.append(("remove", block.id, False))
        self.inner.remove(block)

    def touch(self, block: BlockMeta, now: float) -> None:
        self.log.append(("touch", block.id, False))
        self.inner.touch(block, now)

    def victims(self, need_bytes: int, now: float) -> list[BlockMeta]:
        return self.inner.victims(need_bytes, now)

    def __len__(self) -> int:
        return len(self.inner)


class RecordingPolicy:
    """The default policy; ``indexes`` lists (reload latency, reload tier, index) per tier."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self.costs: ReloadCostModel = bundle.costs
        self.indexes: list[tuple[float, str | None, RecordingIndex]] = []
        self.log: list[tuple[str, str, bool]] = []

    @property
    def hotness(self):  # type: ignore[no-untyped-def]
        return self.bundle.hotness

    @property
    def placement(self):  # type: ignore[no-untyped-def]
        return self.bundle.placement

    def new_index(self, reload_latency: float, tier: str | None) -> RecordingIndex:
        index = RecordingIndex(self.bundle.new_index(reload_latency, tier), self.log)
        self.indexes.append((reload_latency, tier, index))
        return index

    def on_put(self, block: BlockMeta) -> None:
        self.bundle.on_put(block)

    def on_read(self, block: BlockMeta, now: float) -> Sequence[str]:
        return self.bundle.on_read(block, now)

    def should_promote(
        self, block: BlockMeta, from_tier: TierView | str, to_tier: TierView, now: float
    ) -> bool:
        return self.bundle.should_promote(block, from_tier, to_tier, now)


def recording_kit(tmp_path: Path) -> tuple[StoreKit, RecordingPolicy]:
    settings = make_settings()
    policy = RecordingPolicy(default_policy(settings))
    return StoreKit(tmp_path / "data", settings, policy=policy), policy


def segment(policy: RecordingPolicy, position: int, block_id: str) -> str | None:
    index = policy.indexes[position][2].inner
    for meta in index.blocks():
        if meta.id == block_id:
            return index.segment_of(meta)
    return None


def test_each_tier_ranks_its_victims_by_the_tier_they_would_be_reloaded_from(
    tmp_path: Path,
) -> None:
    kit, policy = recording_kit(tmp_path)
    assert kit.store.tiers == ["L4", "L5", "L6"]
    # L4's victims go to L5 and come back from there; L6, the last, evicts nothing.
    assert [(lat, tier) for lat, tier, _ in policy.indexes] == [
        (16.0, "L5"),
        (50.0, "L6"),
        (50.0, "L6"),
    ]


def test_prefetched_promotions_wait_apart_and_reads_join_the_window(tmp_path: Path) -> None:
    kit, policy = recording_kit(tmp_path)
    store = kit.store
    for i in range(40):  # L4 at 40 of 64 KiB: the ahead segment may hold 10 % of its bytes
        store.put(f"other/{i}x", rand(KIB, 100 + i))
    for i in range(6):
        store.put(f"seq/{i}", rand(KIB, i))
        store.demote(f"seq/{i}", "L6")
    policy.log.clear()
    assert store.prefetch(["seq/5"]) == 1  # an explicit hint: ahead of the read
    assert ("add", "seq/5", True) in policy.log
    assert segment(policy, 0, "seq/5") == "ahead"
    for i in range(3):  # a stream: seq/3 (and more) predicted, promoted ahead
        store.get(f"seq/{i}")
        kit.clock.advance(0.01)
    store.run_pending()
    assert ("add", "seq/3", True) in policy.log
    assert segment(policy, 0, "seq/3") == "ahead"
    assert segment(policy, 0, "seq/4") == "ahead" and segment(policy, 0, "seq/5") == "ahead"
    # Reads promote as reads: seq/0..2 were added plainly on their way up.
    assert [e for e in policy.log if e[0] == "add" and e[1] < "seq/3"] == [
        ("add", f"seq/{i}", False) for i in range(3)
    ]
    store.get("seq/3")  # the predicted read comes: an ordinary recent block now
    assert segment(policy, 0, "seq/3") == "window"


def test_pin_and_unpin_re_rank_the_block(tmp_path: Path) -> None:
    kit, policy = recording_kit(tmp_path)
    store = kit.store
    store.put("p", rand(KIB))
    policy.log.clear()
    store.pin("p")
    store.unpin("p")
    assert policy.log == [("touch", "p", False), ("touch", "p", False)]


def test_moves_leave_one_index_and_enter_the_next(tmp_path: Path) -> None:
    kit, policy = recording_kit(tmp_path)
    store = kit.store
    store.put("m", rand(KIB))
    policy.log.clear()
    store.demote("m")
    assert policy.log == [("remove", "m", False), ("add", "m", False)]
    assert segment(policy, 0, "m") is None and segment(policy, 1, "m") is not None


def test_reload_costs_are_learned_from_moves_up_only(tmp_path: Path) -> None:
    kit, policy = recording_kit(tmp_path)
    store = kit.store
    costs = policy.costs
    static_l4 = costs.cost(4 * KIB, 5.0, "L4")
    static_l5 = costs.cost(4 * KIB, 16.0, "L5")
    for i in range(4):
        store.put(f"c{i}", rand(4 * KIB, i))
        store.demote(f"c{i}", "L5")  # four moves out of L4, down: writes, not reloads
    assert costs.cost(4 * KIB, 5.0, "L4") == static_l4
    for i in range(4):
        store.get(f"c{i}")  # read from L5, promoted into L4's free room: reloads from L5
        assert store.locate(f"c{i}") == "L4"
    assert costs.cost(4 * KIB, 16.0, "L5") != static_l5
    assert costs.cost(4 * KIB, 5.0, "L4") == static_l4


def test_a_read_never_promotes_a_block_past_the_high_mark_at_warmer_blocks_cost(
    tmp_path: Path,
) -> None:
    """L4 (64 KiB, marks 0.9 / 0.75) holds 54 KiB of blocks read twice. A block read once
    from L5 fits in L4's free bytes but would take it past its high mark, and every block
    the eviction cycle would then push out is warmer: it stays in L5, nothing is evicted."""
    kit, _ = recording_kit(tmp_path)
    store = kit.store
    store.put("cold", rand(8 * KIB, 99))
    store.demote("cold", "L5")
    warm = [f"warm/{i}x" for i in range(6)]
    for i, key in enumerate(warm):
        store.put(key, rand(9 * KIB, i))
        store.get(key)
        store.get(key)
    assert [store.locate(k) for k in warm] == ["L4"] * 6
    before = kit.kinds().count("block_evicted")
    assert store.get("cold") == rand(8 * KIB, 99)
    assert store.locate("cold") == "L5"
    assert [store.locate(k) for k in warm] == ["L4"] * 6
    assert kit.kinds().count("block_evicted") == before
    store.delete(warm[0])  # now it fits under the mark: the next read promotes it
    store.get("cold")
    assert store.locate("cold") == "L4"
    kit.check_invariants()

"""Properties of the memory policy, checked by hypothesis.

* The eviction index stays consistent under any sequence of add / remove / touch / pin /
  readers / evict / re-add (ghost hits, ranking rebuilds) / clock steps.
* ``victims`` never returns a pinned block or one being read, returns distinct members only,
  frees at least the need whenever the movable bytes allow it (and then no more blocks than
  needed), and returns every movable block otherwise.
* The time-invariant key orders blocks exactly as their decayed scores do, at any later time.
* The prefetcher only ever predicts later ids of the stream it just saw, or learned successors.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from vramancer.memory.policy import (
    BlockMeta,
    DecayedHotness,
    HotnessIndex,
    SequentialPrefetcher,
    split_sequence_id,
)


class IndexMachine(RuleBasedStateMachine):
    """Random operations against the index, compared with a plain set of members."""

    blocks = Bundle("blocks")

    def __init__(self) -> None:
        super().__init__()
        self.hot = DecayedHotness(half_life_s=5.0)
        self.index = HotnessIndex(self.hot, window_fraction=0.1, adaptive=True)
        self.members: dict[str, BlockMeta] = {}
        self.now = 0.0
        self.serial = 0

    @rule(
        target=blocks,
        size=st.integers(1, 100),
        priority=st.integers(0, 3),
        hits=st.integers(0, 4),
    )
    def add(self, size: int, priority: int, hits: int) -> BlockMeta:
        self.serial += 1
        b = BlockMeta(
            id=f"b{self.serial}",
            size=size,
            tier="T",
            priority=priority,
            created=self.now,
            last_access=self.now,
        )
        for _ in range(hits):
            self.hot.record_hit(b, self.now)
        self.index.add(b, self.now)
        self.members[b.id] = b
        return b

    @rule(b=blocks)
    def remove(self, b: BlockMeta) -> None:
        self.index.remove(b)
        self.members.pop(b.id, None)

    @rule(b=blocks)
    def touch(self, b: BlockMeta) -> None:
        self.hot.record_hit(b, self.now)
        self.index.touch(b, self.now)

    @rule(b=blocks, prefetched=st.booleans())
    def readd(self, b: BlockMeta, prefetched: bool) -> None:
        """A block (evicted or not) comes back: a ghost hit when it was evicted."""
        if b.id not in self.members:
            self.hot.record_hit(b, self.now)
        self.index.add(b, self.now, prefetched=prefetched)
        self.members[b.id] = b

    @rule(b=blocks, pinned=st.booleans(), readers=st.integers(0, 2))
    def pin(self, b: BlockMeta, pinned: bool, readers: int) -> None:
        b.pinned = pinned
        b.readers = readers

    @rule(seconds=st.floats(0.0, 20.0))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(need=st.integers(0, 600), evict=st.booleans())
    def victims(self, need: int, evict: bool) -> None:
        chosen = self.index.victims(need, self.now)
        ids = [b.id for b in chosen]
        assert len(ids) == len(set(ids))
        for b in chosen:
            assert b.id in self.members
            assert not b.pinned and b.readers == 0
        movable = sum(b.size for b in self.members.values() if not b.pinned and b.readers == 0)
        freed = sum(b.size for b in chosen)
        if need <= 0:
            assert chosen == []
        elif movable >= need:
            assert freed >= need
            assert freed - chosen[-1].size < need  # no block more than needed
        else:
            assert {b.id for b in chosen} == {
                b.id for b in self.members.values() if not b.pinned and b.readers == 0
            }
        if evict:
            for b in chosen:
                self.index.remove(b)
                del self.members[b.id]

    @invariant()
    def consistent(self) -> None:
        index = self.index
        assert len(index) == len(self.members)
        assert index.bytes == sum(b.size for b in self.members.values())
        listed = [b.id for b in index.blocks()]
        assert len(listed) == len(set(listed))
        assert set(listed) == set(self.members)
        for b in self.members.values():
            assert index.segment_of(b) in ("window", "main", "ahead")
        assert 0.0 <= index.recency_weight <= 1.0
        assert index.window_bytes <= index.bytes


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@given(
    st.lists(
        st.tuples(st.integers(1, 20), st.floats(0.0, 500.0)),
        min_size=2,
        max_size=12,
    ),
    st.floats(0.0, 1000.0),
)
@settings(max_examples=200, deadline=None)
def test_log_key_order_is_the_score_order_at_any_later_time(
    spec: list[tuple[int, float]], later: float
) -> None:
    hot = DecayedHotness(half_life_s=30.0)
    blocks = []
    for i, (hits, t) in enumerate(spec):
        b = BlockMeta(id=f"b{i}", size=1, tier="T", created=t, last_access=t)
        for _ in range(hits):
            hot.record_hit(b, t)
        blocks.append(b)
    now = max(t for _, t in spec) + later
    for a in blocks:
        for b in blocks:
            ka, kb = hot.log_key(a), hot.log_key(b)
            sa, sb = hot.score(a, now), hot.score(b, now)
            if sa > 0 and sb > 0 and abs(math.log2(sa) - math.log2(sb)) > 1e-9:
                assert (ka < kb) == (sa < sb)


@given(st.lists(st.tuples(st.sampled_from(["a/", "b/", "c-"]), st.integers(0, 30)), max_size=80))
@settings(max_examples=200, deadline=None)
def test_stream_predictions_are_later_ids_of_the_same_stream(
    reads: list[tuple[str, int]],
) -> None:
    p = SequentialPrefetcher(depth=3)
    history: set[str] = set()
    previous: str | None = None
    for prefix, number in reads:
        block_id = f"{prefix}{number}"
        predicted = list(p.observe(block_id, 0.0))
        for pid in predicted:
            parsed = split_sequence_id(pid)
            same_stream = parsed is not None and parsed[0] == prefix and parsed[1] > number
            # Otherwise it is a learned successor: an id read before, right after this one.
            assert same_stream or pid in history, (block_id, pid)
        assert len(predicted) <= 4
        assert len(set(predicted)) == len(predicted)
        history.add(block_id)
        previous = block_id
    del previous

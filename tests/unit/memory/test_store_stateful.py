"""Hypothesis drives random sequences of store operations against a plain dict model.

Checked after every step: data read back is identical, no tier's accounted bytes exceed its
capacity (and equal the sum of its blocks), pinned blocks never move, nothing is lost.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.errors import Conflict, InsufficientMemory, NotFound

KEYS = st.sampled_from([f"k{i}" for i in range(10)] + ["seq/0", "seq/1", "seq/2", "seq/3"])


def payload(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="vrm-stateful-"))
        self.kit = StoreKit(self.dir, make_settings(l4=8_000, l5=16_000, l6=48_000))
        self.store = self.kit.store
        self.model: dict[str, bytes] = {}
        #: pinned id -> the tier it was in when pinned
        self.pinned: dict[str, str] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        key=KEYS,
        size=st.integers(1, 4000),
        seed=st.integers(0, 2**16),
        priority=st.integers(0, 5),
    )
    def put(self, key: str, size: int, seed: int, priority: int) -> None:
        data = payload(size, seed)
        try:
            self.store.put(key, data, priority=priority)
        except InsufficientMemory:
            return
        self.model[key] = data
        self.pinned.pop(key, None)  # a replaced block starts unpinned

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.store.get(key) == self.model[key]

    @rule(key=KEYS)
    def get_or_missing(self, key: str) -> None:
        if key in self.model:
            assert self.store.get(key) == self.model[key]
        else:
            try:
                self.store.get(key)
            except NotFound:
                return
            raise AssertionError(f"{key} should be missing")

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.store.pin(key)
        self.pinned.setdefault(key, self.store.locate(key))

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pinned)))
        self.store.unpin(key)
        del self.pinned[key]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.store.delete(key)
        del self.model[key]
        self.pinned.pop(key, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), up=st.booleans())
    def move(self, data: st.DataObject, up: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        try:
            if up:
                self.store.promote(key)
            else:
                self.store.demote(key)
        except InsufficientMemory:  # (a Conflict too: caught first)
            pass
        except Conflict:
            assert key in self.pinned

    @rule(force=st.booleans())
    def evict(self, force: bool) -> None:
        self.store.evict_cycle(force=force)

    @rule(seconds=st.sampled_from([0.5, 5.0, 60.0, 600.0]))
    def advance(self, seconds: float) -> None:
        self.kit.clock.advance(seconds)

    @rule(tier=st.sampled_from(["L4", "L5"]), capacity=st.integers(0, 20_000))
    def set_capacity(self, tier: str, capacity: int) -> None:
        self.store.set_capacity(tier, capacity)
        assert self.store.capacity(tier) >= capacity

    @rule(keys=st.lists(KEYS, max_size=3))
    def prefetch(self, keys: list[str]) -> None:
        self.store.prefetch(keys)

    @invariant()
    def nothing_lost_nothing_moved_no_overflow(self) -> None:
        self.kit.check_invariants()
        assert len(self.store) == len(self.model)
        for key in self.model:
            assert key in self.store
        for key, tier in self.pinned.items():
            assert self.store.locate(key) == tier, f"pinned {key} moved"


StoreMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase

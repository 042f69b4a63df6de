"""The mover applies a plan move by move, rechecking each: stale moves are skipped."""

from __future__ import annotations

from pathlib import Path

from tests.unit.memory.store_support import StoreKit
from vramancer.memory.planner import Move


def test_stale_moves_are_skipped_and_the_rest_applied(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path)
    store = kit.store
    assert store.put("a", b"a" * 100) == "L4"
    assert store.put("p", b"p" * 100) == "L4"
    store.pin("p")
    plan = [
        Move("a", 100, "L5", "L6", "evict"),  # not where the plan thought
        Move("gone", 10, "L4", "L5", "evict"),  # deleted since
        Move("a", 999, "L4", "L5", "evict"),  # replaced by another size since
        Move("p", 100, "L4", "L5", "evict"),  # pinned since
        Move("a", 100, "L4", "L5", "evict"),  # still true
    ]
    assert store._moves.apply(plan) == 1
    assert store.locate("a") == "L5"
    assert store.locate("p") == "L4"
    assert store.get("a") == b"a" * 100
    kit.check_invariants()
    store.close()


def test_a_move_into_a_tier_without_room_is_skipped(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path)
    store = kit.store
    store.put("big", b"b" * 50 * 1024)
    store.set_capacity("L5", 1024)
    assert store._moves.apply([Move("big", 50 * 1024, "L4", "L5", "evict")]) == 0
    assert store.locate("big") == "L4"
    store.close()

"""The store's pure planner: exact move lists (block ids, tiers, order) for each plan."""

from __future__ import annotations

from vramancer.memory.planner import (
    BlockView,
    Candidate,
    Move,
    NoRoom,
    TierState,
    pick_hottest,
    plan_compress,
    plan_demotion,
    plan_free,
    plan_promotion,
    plan_room,
    plan_spill,
    plan_warmup,
)

LATENCY = {"L1": 1.0, "L3": 2.5, "L4": 5.0, "L5": 16.0, "L6": 50.0}


def tier(
    name: str,
    target: int,
    used: int,
    *victims: tuple[str, int] | tuple[str, int, float],
    high: float = 0.9,
    low: float = 0.75,
) -> TierState:
    return TierState(
        name,
        LATENCY[name],
        target,
        used,
        high,
        low,
        disk=name in ("L5", "L6"),
        victims=tuple(Candidate(*v) for v in victims),
    )


def move(block: str, size: int, source: str, target: str, reason: str) -> Move:
    return Move(block, size, source, target, reason)


# ------------------------------------------------------------------------------- plan_room


def test_room_that_is_free_needs_no_move() -> None:
    tiers = [tier("L4", 1000, 100, ("a", 100)), tier("L5", 1000, 0)]
    assert plan_room(tiers, "L4", 500) == []


def test_room_demotes_victims_in_index_order_down_to_the_low_mark() -> None:
    tiers = [
        tier("L4", 1000, 900, ("a", 100), ("b", 200), ("c", 300), ("d", 300)),
        tier("L5", 10_000, 0),
    ]
    # 100 free < 150; 900 + 150 > 900 (high): free down to 750 -> 300 bytes: a then b.
    assert plan_room(tiers, "L4", 100) == []
    assert plan_room(tiers, "L4", 150) == [
        move("a", 100, "L4", "L5", "room"),
        move("b", 200, "L4", "L5", "room"),
    ]


def test_room_goes_to_the_nearest_lower_tier_with_room() -> None:
    tiers = [
        tier("L3", 1000, 1000, ("a", 300), ("b", 300)),
        tier("L4", 1000, 800),
        tier("L5", 10_000, 0),
    ]
    # need 1000 + 200 - 750 = 450: a fits in L4 (200 free? no: 200 < 300) -> L5; b -> L5.
    assert plan_room(tiers, "L3", 200) == [
        move("a", 300, "L3", "L5", "room"),
        move("b", 300, "L3", "L5", "room"),
    ]


def test_room_cascades_lower_moves_first() -> None:
    tiers = [
        tier("L4", 1000, 1000, ("a", 400)),
        tier("L5", 1000, 900, ("x", 200), ("y", 150)),
        tier("L6", 1000, 650),
    ]
    # L4 needs 1000 + 100 - 750 = 350: victim a (400). No tier below has 400 free, so L5 frees
    # 900 + 400 - 750 = 550 first: x and y go to L6 (cascade, all it has), then a into L5.
    assert plan_room(tiers, "L4", 100) == [
        move("x", 200, "L5", "L6", "evict"),
        move("y", 150, "L5", "L6", "evict"),
        move("a", 400, "L4", "L5", "room"),
    ]


def test_room_is_a_value_when_the_victims_cannot_free_enough() -> None:
    tiers = [tier("L4", 1000, 1000, ("a", 100)), tier("L5", 10_000, 0)]
    assert plan_room(tiers, "L4", 500) == NoRoom("L4", 500, 100)


def test_room_for_a_block_larger_than_the_tier() -> None:
    tiers = [tier("L4", 1000, 0), tier("L5", 10_000, 0)]
    assert plan_room(tiers, "L4", 2000) == NoRoom("L4", 2000, 1000)


def test_room_from_colder_blocks_only() -> None:
    tiers = [tier("L4", 1000, 1000, ("a", 300, 0.1), ("b", 300, 2.0)), tier("L5", 10_000, 0)]
    # need 350 takes a and b; b is not colder than 1.0: nothing moves.
    assert plan_room(tiers, "L4", 100, colder_than=1.0) == NoRoom("L4", 100, 0)
    assert plan_room(tiers, "L4", 100, colder_than=3.0) == [
        move("a", 300, "L4", "L5", "room"),
        move("b", 300, "L4", "L5", "room"),
    ]


def test_room_stops_when_a_victim_finds_no_room_below() -> None:
    tiers = [tier("L4", 1000, 1000, ("a", 300), ("b", 300)), tier("L5", 400, 0)]
    # need 650: a goes to L5, b finds no room (L5 is the slowest): 300 free, not 400.
    assert plan_room(tiers, "L4", 400) == NoRoom("L4", 400, 300)
    assert plan_free(tiers, "L4", 550) == [move("a", 300, "L4", "L5", "evict")]


def test_room_in_the_slowest_tier_moves_nothing() -> None:
    tiers = [tier("L5", 1000, 0), tier("L6", 1000, 1000, ("a", 500))]
    assert plan_room(tiers, "L6", 100) == NoRoom("L6", 100, 0)


# ------------------------------------------------------------------------------- plan_free


def test_free_is_best_effort_and_uses_the_reason() -> None:
    tiers = [
        tier("L4", 1000, 950, ("a", 100), ("b", 100), ("c", 100)),
        tier("L5", 150, 0),
        tier("L6", 10_000, 0, ("z", 1)),
    ]
    assert plan_free(tiers, "L4", 300, reason="capacity") == [
        move("a", 100, "L4", "L5", "capacity"),
        move("b", 100, "L4", "L6", "capacity"),
        move("c", 100, "L4", "L6", "capacity"),
    ]
    assert plan_free(tiers, "L4", 0) == []


# ------------------------------------------------------------------------------- promotion


def test_promotion_into_the_first_target_with_room_under_the_high_mark() -> None:
    tiers = [tier("L3", 1000, 850), tier("L4", 1000, 0), tier("L5", 1000, 100)]
    block = Candidate("k", 100)
    # L3: 850 + 100 > 900, L4 fits.
    assert plan_promotion(tiers, block, "L5", ["L3", "L4"], room_only=True) == [
        move("k", 100, "L5", "L4", "hit")
    ]


def test_promotion_room_only_is_no_room_when_full() -> None:
    tiers = [tier("L4", 1000, 900), tier("L5", 1000, 100)]
    assert plan_promotion(tiers, Candidate("k", 100), "L5", ["L4"], room_only=True) == NoRoom(
        "L4", 100, 100
    )


def test_promotion_makes_room_from_colder_blocks_then_moves_the_block_last() -> None:
    tiers = [
        tier("L4", 1000, 900, ("a", 200, 0.5), ("b", 200, 0.5)),
        tier("L5", 10_000, 100),
    ]
    # 900 + 100 > 900: free 1000 - 750 = 250 (a, b), all colder than 2.0.
    assert plan_promotion(tiers, Candidate("k", 100), "L5", ["L4"], colder_than=2.0) == [
        move("a", 200, "L4", "L5", "room"),
        move("b", 200, "L4", "L5", "room"),
        move("k", 100, "L5", "L4", "hit"),
    ]
    # A victim as hot as the block: nothing moves.
    assert plan_promotion(tiers, Candidate("k", 100), "L5", ["L4"], colder_than=0.5) == NoRoom(
        "L4", 100, 100
    )


def test_promotion_never_demotes_the_block_it_promotes() -> None:
    tiers = [
        tier("L4", 1000, 1000, ("a", 500, 0.1)),
        tier("L5", 600, 500, ("k", 100, 0.1), ("m", 400, 0.1)),
        tier("L6", 1000, 550),
    ]
    # L4's victim a cascades into L5, whose victims skip k (the block being promoted).
    assert plan_promotion(
        tiers, Candidate("k", 100), "L5", ["L4"], reason="prefetch", colder_than=1.0
    ) == [
        move("m", 400, "L5", "L6", "evict"),
        move("a", 500, "L4", "L5", "room"),
        move("k", 100, "L5", "L4", "prefetch"),
    ]


def test_promotion_tries_the_next_target_without_the_first_ones_moves() -> None:
    tiers = [
        tier("L3", 1000, 1000, ("hot", 500, 9.0)),
        tier("L4", 1000, 1000, ("a", 300, 0.1)),
        tier("L5", 10_000, 0),
    ]
    assert plan_promotion(tiers, Candidate("k", 100), "L5", ["L3", "L4"], colder_than=1.0) == [
        move("a", 300, "L4", "L5", "room"),
        move("k", 100, "L5", "L4", "hit"),
    ]


# ------------------------------------------------------------------------------- demotion


def test_demotion_to_the_nearest_lower_tier_with_room() -> None:
    tiers = [tier("L4", 1000, 500), tier("L5", 1000, 950), tier("L6", 1000, 0)]
    assert plan_demotion(tiers, Candidate("k", 100), "L4") == [
        move("k", 100, "L4", "L6", "explicit")
    ]


def test_demotion_makes_room_below_by_cascading() -> None:
    tiers = [
        tier("L4", 1000, 500),
        tier("L5", 1000, 800, ("x", 400)),
        tier("L6", 1000, 1000),
    ]
    # L5 would free 800 + 600 - 750 = 650 (x), but L6 is full: no room below.
    assert plan_demotion(tiers, Candidate("k", 600), "L4") == NoRoom(None, 600, 200)
    tiers[2] = tier("L6", 1000, 500)
    # L6 has 500 free (not 600): x goes there, which leaves 600 in L5 for k.
    assert plan_demotion(tiers, Candidate("k", 600), "L4") == [
        move("x", 400, "L5", "L6", "evict"),
        move("k", 600, "L4", "L5", "explicit"),
    ]


# ------------------------------------------------------------------------------- warmup etc.


def view(block: str, size: int, where: str, score: float, *targets: str) -> BlockView:
    return BlockView(block, size, where, score, targets)


def test_warmup_moves_the_hottest_first_where_there_is_room() -> None:
    tiers = [tier("L3", 1000, 700), tier("L4", 1000, 0), tier("L5", 10_000, 1000)]
    blocks = [
        view("cold", 100, "L5", 0.1, "L3", "L4"),
        view("warm", 150, "L5", 2.0, "L3", "L4"),
        view("hot", 150, "L5", 5.0, "L3", "L4"),
        view("hotter", 100, "L4", 9.0, "L3"),
    ]
    assert plan_warmup(tiers, blocks, max_blocks=3, floor=0.25) == [
        move("hotter", 100, "L4", "L3", "warmup"),
        move("hot", 150, "L5", "L4", "warmup"),  # L3: 800 + 150 > 900
        move("warm", 150, "L5", "L4", "warmup"),
    ]
    assert plan_warmup(tiers, blocks, max_blocks=1, floor=9.0) == []


def test_pick_hottest_keeps_order_and_floor() -> None:
    blocks = [view("a", 1, "L4", 1.0), view("b", 1, "L4", 3.0), view("c", 1, "L4", 0.2)]
    assert [b.id for b in pick_hottest(blocks, 5, 0.25)] == ["b", "a"]


def test_compress_moves_the_coldest_under_the_floor_to_the_first_disk_tier_with_room() -> None:
    tiers = [tier("L4", 1000, 600), tier("L5", 250, 0), tier("L6", 10_000, 0)]
    blocks = [
        view("a", 200, "L4", 0.2),
        view("b", 200, "L4", 0.0),
        view("warm", 100, "L4", 0.5),
        view("c", 100, "L4", 0.1),
        view("elsewhere", 100, "L5", 0.0),
    ]
    assert plan_compress(tiers, blocks, source="L4", max_blocks=10, floor=0.25) == [
        move("b", 200, "L4", "L5", "compress"),
        move("c", 100, "L4", "L6", "compress"),
        move("a", 200, "L4", "L6", "compress"),
    ]
    assert plan_compress(tiers, blocks, source="L4", max_blocks=1, floor=0.25) == [
        move("b", 200, "L4", "L5", "compress")
    ]


def test_spill_moves_memory_blocks_hottest_first_where_room() -> None:
    tiers = [tier("L3", 1000, 300), tier("L4", 1000, 400), tier("L5", 250, 0), tier("L6", 300, 0)]
    blocks = [
        view("a", 200, "L4", 1.0),
        view("b", 200, "L4", 3.0),
        view("p", 300, "L3", 2.0),
        view("ondisk", 10, "L5", 9.0),
    ]
    assert plan_spill(tiers, blocks) == [
        move("b", 200, "L4", "L5", "spill"),
        move("p", 300, "L3", "L6", "spill"),
    ]


def test_plans_leave_their_inputs_alone() -> None:
    tiers = (tier("L4", 1000, 1000, ("a", 400)), tier("L5", 10_000, 0))
    before = tuple(tiers)
    plan_room(tiers, "L4", 100)
    assert tiers == before

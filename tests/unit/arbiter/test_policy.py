"""The arbiter's pure policy: quality curve, plans, exact victim order, budget shrink."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramancer.arbiter.policy import (
    AllocationRequest,
    Budget,
    Grant,
    NoRoom,
    QualityPolicy,
    QualityTooLow,
    fit_to_budget,
    plan_allocation,
    pressure_ratio,
    victim_order,
)
from vramancer.arbiter.settings import DEFAULT_MIN_QUALITY
from vramancer.arbiter.types import Allocation, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.units import GIB

POLICY = QualityPolicy(DEFAULT_MIN_QUALITY, pressure_low=0.5)
BG, NORMAL, HIGH, UF = Priority.BACKGROUND, Priority.NORMAL, Priority.HIGH, Priority.USER_FACING


def alloc(
    id_: str,
    priority: Priority,
    gib: float,
    seq: int,
    device: str | None = None,
    preemptible: bool = True,
) -> Allocation:
    return Allocation(
        id=id_,
        workload_type=WorkloadType.LLM,
        priority=priority,
        memory_bytes=int(gib * GIB),
        quality_target=1.0,
        device=device,
        seq=seq,
        preemptible=preemptible,
    )


def req(
    priority: Priority,
    gib: float,
    *,
    device: str | None = None,
    min_quality: float | None = None,
    preempt: bool = True,
    kind: WorkloadType = WorkloadType.LLM,
) -> AllocationRequest:
    gpu = DeviceId.parse(device) if device is not None else None
    return AllocationRequest(kind, priority, int(gib * GIB), min_quality, gpu, preempt)


def victim_ids(plan: object) -> list[str]:
    assert isinstance(plan, Grant), plan
    return [v.id for v in plan.victims]


# --------------------------------------------------------------------------- quality


def test_quality_is_full_up_to_the_knee_and_the_minimum_at_full_pressure() -> None:
    assert POLICY.quality(WorkloadType.LLM, BG, 0.0) == 1.0
    assert POLICY.quality(WorkloadType.LLM, BG, 0.5) == 1.0
    assert POLICY.quality(WorkloadType.LLM, BG, 0.75) == pytest.approx(0.7)
    assert POLICY.quality(WorkloadType.LLM, BG, 1.0) == pytest.approx(0.4)
    assert POLICY.quality(WorkloadType.IMAGE, BG, 1.0) == pytest.approx(0.3)
    assert POLICY.quality(WorkloadType.VIDEO, UF, 1.0) == pytest.approx(0.3)
    assert POLICY.quality(WorkloadType.EMBEDDING, NORMAL, 1.0) == pytest.approx(0.5)
    assert POLICY.quality(WorkloadType.OTHER, BG, 1.0) == 1.0
    # over-committed (budget shrank): never below the minimum
    assert POLICY.quality(WorkloadType.LLM, BG, 3.0) == pytest.approx(0.4)


def test_knees_are_later_for_higher_priorities() -> None:
    knees = [POLICY.knee(p) for p in (BG, NORMAL, HIGH, UF)]
    assert knees == pytest.approx([0.5, 0.55, 0.6, 0.7])
    # at 0.65 a user-facing LLM still runs at full quality, a background one does not
    assert POLICY.quality(WorkloadType.LLM, UF, 0.65) == 1.0
    assert POLICY.quality(WorkloadType.LLM, BG, 0.65) < 1.0


def test_seed_003_example_high_llm_beats_normal_diffusion() -> None:
    """24 GB, a 10 GB high LLM then an 8 GB normal image: LLM quality ≥ image's."""
    pressure = pressure_ratio(18 * GIB, 24 * GIB)
    llm = POLICY.quality(WorkloadType.LLM, HIGH, pressure)
    image = POLICY.quality(WorkloadType.IMAGE, NORMAL, pressure)
    assert llm >= image
    assert 0.3 <= image < 1.0


def test_zero_budget_is_full_pressure() -> None:
    assert pressure_ratio(0, 0) == 1.0
    assert pressure_ratio(5, 10) == 0.5


priorities = st.sampled_from(list(Priority))
kinds = st.sampled_from(list(WorkloadType))
pressures = st.floats(min_value=0.0, max_value=2.0, allow_nan=False)


@given(kinds, priorities, priorities, pressures)
def test_higher_priority_never_gets_lower_quality(
    kind: WorkloadType, a: Priority, b: Priority, pressure: float
) -> None:
    low, high = sorted((a, b), key=lambda p: p.rank)
    assert POLICY.quality(kind, high, pressure) >= POLICY.quality(kind, low, pressure)


@given(kinds, priorities, pressures, pressures)
def test_quality_never_rises_with_pressure_and_stays_in_range(
    kind: WorkloadType, priority: Priority, p1: float, p2: float
) -> None:
    lo, hi = sorted((p1, p2))
    q_lo, q_hi = POLICY.quality(kind, priority, lo), POLICY.quality(kind, priority, hi)
    assert q_lo >= q_hi
    assert DEFAULT_MIN_QUALITY[kind] - 1e-9 <= q_hi <= 1.0


# --------------------------------------------------------------------------- plans


FULL_12 = [
    alloc("a1", BG, 2, seq=1),
    alloc("a2", BG, 2, seq=2),
    alloc("a3", NORMAL, 4, seq=3),
    alloc("a4", HIGH, 4, seq=4),
]
BUDGET_12 = Budget(12 * GIB)


def test_grant_without_victims_when_it_fits() -> None:
    plan = plan_allocation(req(NORMAL, 3), FULL_12[:2], BUDGET_12, POLICY)
    assert isinstance(plan, Grant)
    assert plan.victims == ()
    assert plan.pressure_ratio == pytest.approx(7 / 12)
    assert plan.quality_target == POLICY.quality(WorkloadType.LLM, NORMAL, 7 / 12)


def test_victim_choice_lowest_priority_then_most_recent() -> None:
    assert victim_ids(plan_allocation(req(UF, 2), FULL_12, BUDGET_12, POLICY)) == ["a2"]
    assert victim_ids(plan_allocation(req(UF, 3), FULL_12, BUDGET_12, POLICY)) == ["a2", "a1"]
    # 5 GiB: a2, a1 are not enough, a3 is needed, and then a1 is spared (a2 is preferred)
    assert victim_ids(plan_allocation(req(UF, 5), FULL_12, BUDGET_12, POLICY)) == ["a2", "a3"]
    # 8 GiB: both background holders and the normal one are all needed
    assert victim_ids(plan_allocation(req(UF, 8), FULL_12, BUDGET_12, POLICY)) == [
        "a2",
        "a1",
        "a3",
    ]
    # 9 GiB: the high holder is needed too, which makes a1 unnecessary (2+4+4 ≥ 9)
    assert victim_ids(plan_allocation(req(UF, 9), FULL_12, BUDGET_12, POLICY)) == [
        "a2",
        "a3",
        "a4",
    ]
    assert victim_ids(plan_allocation(req(NORMAL, 1), FULL_12, BUDGET_12, POLICY)) == ["a2"]
    assert victim_order(FULL_12) == [FULL_12[1], FULL_12[0], FULL_12[2], FULL_12[3]]


def test_a_larger_later_victim_spares_the_small_ones() -> None:
    holders = [alloc("small", BG, 1, seq=5), alloc("big", NORMAL, 9, seq=1)]
    plan = plan_allocation(req(HIGH, 6), holders, Budget(10 * GIB), POLICY)
    assert victim_ids(plan) == ["big"]


def test_only_strictly_lower_and_preemptible_holders_are_taken() -> None:
    holders = [
        alloc("same", HIGH, 4, seq=3),
        alloc("pinned", BG, 4, seq=2, preemptible=False),
        alloc("free", NORMAL, 4, seq=1),
    ]
    budget = Budget(12 * GIB)
    assert victim_ids(plan_allocation(req(HIGH, 4), holders, budget, POLICY)) == ["free"]
    plan = plan_allocation(req(HIGH, 5), holders, budget, POLICY)
    assert plan == NoRoom(
        requested_bytes=5 * GIB,
        available_bytes=0,
        reclaimable_bytes=4 * GIB,
        budget_bytes=12 * GIB,
    )


def test_no_preemption_when_asked_not_to() -> None:
    plan = plan_allocation(req(UF, 1, preempt=False), FULL_12, BUDGET_12, POLICY)
    assert plan == NoRoom(1 * GIB, 0, 0, 12 * GIB)


def test_no_room_reports_requested_and_available() -> None:
    plan = plan_allocation(req(NORMAL, 5), [alloc("x", NORMAL, 6, 1)], Budget(10 * GIB), POLICY)
    assert plan == NoRoom(5 * GIB, 4 * GIB, 0, 10 * GIB)
    assert isinstance(plan_allocation(req(UF, 11), [], Budget(10 * GIB), POLICY), NoRoom)


def test_device_scope_only_takes_useful_victims() -> None:
    budget = Budget(20 * GIB, {"gpu:0": 10 * GIB, "gpu:1": 10 * GIB})
    holders = [
        alloc("g0-old", BG, 6, seq=1, device="gpu:0"),
        alloc("g0-new", BG, 4, seq=2, device="gpu:0"),
        alloc("g1-newest", BG, 4, seq=3, device="gpu:1"),
    ]
    # gpu:0 is full, the total is not: the newest holder (on gpu:1) would not help
    assert victim_ids(plan_allocation(req(HIGH, 4, device="gpu:0"), holders, budget, POLICY)) == [
        "g0-new"
    ]
    # gpu:1 has room
    plan = plan_allocation(req(HIGH, 4, device="gpu:1"), holders, budget, POLICY)
    assert isinstance(plan, Grant) and plan.victims == ()
    # unknown device: no budget there
    plan = plan_allocation(req(HIGH, 1, device="gpu:7"), holders, budget, POLICY)
    assert isinstance(plan, NoRoom) and plan.budget_bytes == 0


def test_device_request_may_free_elsewhere_when_the_total_binds() -> None:
    budget = Budget(12 * GIB, {"gpu:0": 10 * GIB, "gpu:1": 10 * GIB})
    holders = [alloc("g1", BG, 8, seq=2, device="gpu:1"), alloc("any", BG, 2, seq=1)]
    # gpu:0 is empty but the total (12) allows only 2 more: take the most recent (g1)
    assert victim_ids(plan_allocation(req(HIGH, 6, device="gpu:0"), holders, budget, POLICY)) == [
        "g1"
    ]


def test_pressure_is_the_worse_of_total_and_device() -> None:
    budget = Budget(20 * GIB, {"gpu:0": 10 * GIB, "gpu:1": 10 * GIB})
    plan = plan_allocation(req(BG, 9, device="gpu:0"), [], budget, POLICY)
    assert isinstance(plan, Grant)
    assert plan.pressure_ratio == pytest.approx(0.9)


def test_min_quality_preempts_to_lower_the_pressure_or_refuses() -> None:
    budget = Budget(10 * GIB)
    holders = [alloc("bg", BG, 7, seq=1)]
    plan = plan_allocation(req(NORMAL, 1, min_quality=0.9), holders, budget, POLICY)
    assert victim_ids(plan) == ["bg"]
    assert isinstance(plan, Grant) and plan.quality_target == 1.0
    refused = plan_allocation(
        req(NORMAL, 1, min_quality=0.9, preempt=False), holders, budget, POLICY
    )
    expected = POLICY.quality(WorkloadType.LLM, NORMAL, 0.8)
    assert refused == QualityTooLow(minimum_quality=0.9, available_quality=expected)
    # a minimum at or below the floor never refuses
    low = plan_allocation(req(NORMAL, 3, min_quality=0.4, preempt=False), holders, budget, POLICY)
    assert isinstance(low, Grant)


# --------------------------------------------------------------------------- budget shrink


def test_fit_to_budget_drops_gone_devices_then_lowest_priority_first() -> None:
    holders = [
        alloc("keep", UF, 4, seq=1, device="gpu:0"),
        alloc("never", BG, 2, seq=2, device="gpu:0", preemptible=False),
        alloc("bg", BG, 2, seq=3, device="gpu:0"),
        alloc("normal", NORMAL, 2, seq=4, device="gpu:0"),
        alloc("gone", HIGH, 1, seq=5, device="gpu:1"),
    ]
    budget = Budget(7 * GIB, {"gpu:0": 7 * GIB})
    assert [v.id for v in fit_to_budget(holders, budget)] == ["gone", "bg", "normal"]
    # the never-evict holder goes only when nothing else is left to take
    tiny = Budget(3 * GIB, {"gpu:0": 3 * GIB})
    assert [v.id for v in fit_to_budget(holders, tiny)] == ["gone", "bg", "normal", "keep"]
    assert fit_to_budget(holders[:3], Budget(8 * GIB, {"gpu:0": 8 * GIB})) == []

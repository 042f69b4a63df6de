"""Headroom: the most a request could be granted now, a dry run of the arbiter's own plan."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.arbiter.conftest import MakeArbiter
from vramancer.arbiter.policy import (
    AllocationRequest,
    Budget,
    Grant,
    NoRoom,
    QualityPolicy,
    headroom,
    plan_allocation,
)
from vramancer.arbiter.settings import DEFAULT_MIN_QUALITY
from vramancer.arbiter.types import Allocation, Priority, WorkloadType
from vramancer.devices.ids import CPU, DeviceId
from vramancer.units import GIB, MIB

POLICY = QualityPolicy(DEFAULT_MIN_QUALITY, pressure_low=0.5)
BUDGET = Budget(total_bytes=1400 * MIB, devices={"gpu:0": 900 * MIB, "gpu:1": 600 * MIB})

holders = st.lists(
    st.tuples(
        st.sampled_from(list(Priority)),
        st.integers(min_value=1, max_value=6).map(lambda n: n * 50 * MIB),
        st.sampled_from([None, "gpu:0", "gpu:1"]),
        st.booleans(),
    ),
    max_size=8,
)


def fitting(spec: list[tuple[Priority, int, str | None, bool]]) -> list[Allocation]:
    """The holders, keeping only those that fit the budget (as the arbiter would)."""
    out: list[Allocation] = []
    total: dict[str | None, int] = {}
    for seq, (priority, size, device, preemptible) in enumerate(spec, start=1):
        over_total = sum(total.values()) + size > BUDGET.total_bytes
        over_device = device is not None and total.get(device, 0) + size > BUDGET.devices[device]
        if over_total or over_device:
            continue
        total[device] = total.get(device, 0) + size
        out.append(
            Allocation(
                id=f"a{seq}",
                workload_type=WorkloadType.OTHER,
                priority=priority,
                memory_bytes=size,
                quality_target=1.0,
                device=device,
                seq=seq,
                preemptible=preemptible,
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(
    holders,
    st.sampled_from([None, "gpu:0", "gpu:1"]),
    st.one_of(st.none(), st.sampled_from(list(Priority))),
)
def test_headroom_is_the_largest_request_the_plan_grants(
    spec: list[tuple[Priority, int, str | None, bool]],
    device: str | None,
    priority: Priority | None,
) -> None:
    allocations = fitting(spec)
    room = headroom(allocations, BUDGET, device=device, priority=priority)
    asked = priority if priority is not None else Priority.BACKGROUND

    def plan(size: int) -> object:
        gpu = DeviceId.parse(device) if device is not None else None
        request = AllocationRequest(
            WorkloadType.OTHER, asked, size, None, gpu, preempt=priority is not None
        )
        return plan_allocation(request, allocations, BUDGET, POLICY)

    if room > 0:
        assert isinstance(plan(room), Grant)
    assert isinstance(plan(room + 1), NoRoom)


def test_spared_holders_are_not_counted() -> None:
    low = Allocation("m", WorkloadType.LLM, Priority.BACKGROUND, 500 * MIB, 1.0, "gpu:0", "m", 0, 1)
    assert headroom([low], BUDGET, device="gpu:0", priority=Priority.HIGH) == 900 * MIB
    assert headroom([low], BUDGET, device="gpu:0") == 400 * MIB
    spared = headroom(
        [low], BUDGET, device="gpu:0", priority=Priority.HIGH, spare=lambda a: a.owner == "m"
    )
    assert spared == 400 * MIB


def test_unknown_device_has_no_headroom() -> None:
    assert headroom([], BUDGET, device="gpu:7") == 0


def test_arbiter_headroom_follows_grants_and_preemption(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB, 10 * GIB, usable_fraction=1.0)
    gpu0 = DeviceId(0)
    assert arbiter.headroom(gpu0) == 10 * GIB
    assert arbiter.headroom() == 20 * GIB
    arbiter.allocate(
        AllocationRequest(WorkloadType.OTHER, Priority.BACKGROUND, 6 * GIB, device=DeviceId(0))
    )
    assert arbiter.headroom(gpu0) == 4 * GIB
    assert arbiter.headroom(gpu0, priority=Priority.BACKGROUND) == 4 * GIB
    assert arbiter.headroom(gpu0, priority=Priority.USER_FACING) == 10 * GIB
    assert arbiter.headroom(DeviceId(1), priority=Priority.USER_FACING) == 10 * GIB
    assert arbiter.headroom(priority=Priority.HIGH) == 20 * GIB
    assert arbiter.state().allocated_bytes == 6 * GIB  # a dry run changes nothing


def test_arbiter_headroom_without_preemption_or_for_other_devices(
    make_arbiter: MakeArbiter,
) -> None:
    arbiter = make_arbiter(10 * GIB, usable_fraction=1.0, preemption=False)
    arbiter.allocate(
        AllocationRequest(WorkloadType.OTHER, Priority.BACKGROUND, 6 * GIB, device=DeviceId(0))
    )
    assert arbiter.headroom(DeviceId(0), priority=Priority.USER_FACING) == 4 * GIB
    assert arbiter.headroom(DeviceId(3)) == 0
    assert arbiter.headroom(CPU) == 0
    assert arbiter.headroom(DeviceId(0, "other-node")) == 0


def test_reclaimable_counts_what_the_priority_may_take(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB, 10 * GIB, usable_fraction=1.0)
    arbiter.allocate(
        AllocationRequest(WorkloadType.OTHER, Priority.BACKGROUND, 2 * GIB, device=DeviceId(0))
    )
    arbiter.allocate(
        AllocationRequest(WorkloadType.OTHER, Priority.HIGH, 3 * GIB, device=DeviceId(0))
    )
    arbiter.allocate(
        AllocationRequest(
            WorkloadType.OTHER, Priority.BACKGROUND, 1 * GIB, device=DeviceId(1), owner="keep"
        )
    )
    gpu0 = DeviceId(0)
    assert arbiter.reclaimable(gpu0, priority=None) == 0
    assert arbiter.reclaimable(gpu0, priority=Priority.NORMAL) == 2 * GIB
    assert arbiter.reclaimable(gpu0, priority=Priority.USER_FACING) == 5 * GIB
    assert arbiter.reclaimable(priority=Priority.NORMAL) == 3 * GIB
    spare_keep = arbiter.reclaimable(priority=Priority.NORMAL, spare=lambda a: a.owner == "keep")
    assert spare_keep == 2 * GIB

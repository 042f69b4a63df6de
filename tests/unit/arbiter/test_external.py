"""Memory used outside VRAMancer (driver-used less reserved) is never granted."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.arbiter.conftest import FixedDevices, MakeArbiter
from vramancer import event_types as ev
from vramancer.arbiter.policy import Budget, Grant, NoRoom, QualityPolicy, headroom, plan_allocation
from vramancer.arbiter.types import AllocationRequest, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.errors import InsufficientMemory
from vramancer.events import EventBus
from vramancer.units import GIB

LLM, OTHER = WorkloadType.LLM, WorkloadType.OTHER
NORMAL = Priority.NORMAL
POLICY = QualityPolicy({kind: 0.4 for kind in WorkloadType})
BUDGET = int(8 * GIB * 0.9)


def budget(external: int) -> Budget:
    return Budget(
        BUDGET, {"gpu:0": BUDGET}, external={"gpu:0": external}, memory={"gpu:0": 8 * GIB}
    )


def ask(size: int) -> AllocationRequest:
    return AllocationRequest(OTHER, NORMAL, size, device=DeviceId(0))


def test_external_memory_beyond_the_margin_comes_off_the_budget() -> None:
    plan = plan_allocation(ask(7 * GIB), [], budget(2 * GIB), POLICY)
    assert plan == NoRoom(
        requested_bytes=7 * GIB,
        available_bytes=6 * GIB,
        reclaimable_bytes=0,
        budget_bytes=BUDGET,
        device="gpu:0",
        external_bytes=2 * GIB,
    )
    assert isinstance(plan_allocation(ask(6 * GIB), [], budget(2 * GIB), POLICY), Grant)
    assert headroom([], budget(2 * GIB), device="gpu:0") == 6 * GIB


def test_external_memory_within_the_margin_takes_nothing_from_the_budget() -> None:
    small = budget(GIB // 2)  # the margin is 0.8 GiB: driver contexts live there
    assert small.grantable("gpu:0") == BUDGET
    assert headroom([], small, device="gpu:0") == BUDGET
    assert small.grantable_total == BUDGET


async def test_a_request_over_what_external_memory_leaves_is_refused_naming_it(
    make_arbiter: MakeArbiter,
) -> None:
    devices = FixedDevices(8 * GIB)
    devices.used[0] = 2 * GIB
    arbiter = make_arbiter(devices=devices)
    await arbiter.start()
    with pytest.raises(InsufficientMemory) as refused:
        arbiter.allocate(ask(7 * GIB))
    assert refused.value.details["external_bytes"] == 2 * GIB
    assert refused.value.details["available_bytes"] == 6 * GIB
    assert "2.0 GiB used outside VRAMancer" in refused.value.message
    assert arbiter.headroom(DeviceId(0)) == 6 * GIB
    usage = arbiter.state().devices[0]
    assert (usage.external_bytes, usage.available_bytes) == (2 * GIB, 6 * GIB)


async def test_reserved_memory_in_use_is_not_external_and_external_preempts_nobody(
    make_arbiter: MakeArbiter,
) -> None:
    devices = FixedDevices(8 * GIB)
    arbiter = make_arbiter(devices=devices)
    await arbiter.start()
    held = arbiter.allocate(ask(3 * GIB))
    devices.used[0] = 3 * GIB  # the holder's process uses what it reserved
    assert arbiter.headroom(DeviceId(0)) == BUDGET - 3 * GIB
    devices.used[0] = 8 * GIB  # another program takes the rest of the GPU
    arbiter.refresh_budget()
    assert [a.id for a in arbiter.allocations()] == [held.id]
    assert arbiter.headroom(DeviceId(0)) == 0
    with pytest.raises(InsufficientMemory):
        arbiter.allocate(ask(GIB))
    devices.used[0] = 3 * GIB  # it is gone: the memory is grantable again
    assert arbiter.allocate(ask(4 * GIB)).memory_bytes == 4 * GIB


def test_quality_reason_says_what_the_target_means_and_why() -> None:
    from vramancer.arbiter.policy import quality_reason
    from vramancer.arbiter.types import Allocation

    big = budget(0)
    half = plan_allocation(
        AllocationRequest(LLM, NORMAL, BUDGET // 2, device=DeviceId(0)), [], big, POLICY
    )
    assert isinstance(half, Grant) and half.quality_target == 1.0
    full = Allocation("alloc-1", LLM, NORMAL, BUDGET // 2, 1.0, "gpu:0")
    assert quality_reason(full, POLICY) == (
        "quality 1.00 = full: 3.6 GiB granted as asked, and after this grant gpu:0 was at most "
        "55% reserved (a normal-priority llm workload runs at full quality while gpu:0 is at "
        "most 55% reserved, then lower down to 0.40 at 100%)"
    )
    tight = plan_allocation(
        AllocationRequest(LLM, NORMAL, BUDGET, device=DeviceId(0)), [], big, POLICY
    )
    assert isinstance(tight, Grant) and tight.quality_target == 0.4
    low = Allocation("alloc-2", LLM, NORMAL, BUDGET, tight.quality_target, "gpu:0")
    assert quality_reason(low, POLICY) == (
        "quality 0.40 (1.00 = full): 7.2 GiB granted as asked, but after this grant gpu:0 was "
        "100% reserved; a normal-priority llm workload runs at full quality while gpu:0 is at "
        "most 55% reserved, then lower down to 0.40 at 100%. The workload should run lighter "
        "to match: lower its precision, resolution or batch size"
    )
    # the pressure is recovered from the target: 0.7 is halfway down the ramp
    mid = Allocation("alloc-3", LLM, NORMAL, GIB, 0.7, "gpu:0")
    assert "gpu:0 was 78% reserved" in quality_reason(mid, POLICY)


def test_a_workload_type_that_never_degrades_says_so() -> None:
    from vramancer.arbiter.policy import quality_reason
    from vramancer.arbiter.types import Allocation

    policy = QualityPolicy({**{kind: 0.4 for kind in WorkloadType}, OTHER: 1.0})
    held = Allocation("alloc-1", OTHER, NORMAL, 6 * GIB, 1.0, "gpu:0")
    assert quality_reason(held, policy) == (
        "quality 1.00 = full: 6.0 GiB granted as asked; other workloads always run at full "
        "quality (their minimum quality is 1.00), whatever the memory pressure"
    )


async def test_a_waiter_is_served_when_external_memory_frees_up(
    make_arbiter: MakeArbiter, bus: EventBus
) -> None:
    devices = FixedDevices(8 * GIB)
    devices.used[0] = 4 * GIB  # another program
    arbiter = make_arbiter(devices=devices)
    await arbiter.start()
    waiting = asyncio.ensure_future(arbiter.acquire(ask(6 * GIB), timeout_s=10))
    await asyncio.sleep(0)
    assert not waiting.done()
    devices.used[0] = 0  # it exited; the device manager tells who listens
    bus.publish(
        ev.VramChanged(
            index=0, uuid="SIM-0", name="sim0", backend="simulated", simulated=True,
            free_before_bytes=4 * GIB, free_after_bytes=8 * GIB, used_bytes=0,
            total_bytes=8 * GIB, delta_free_bytes=4 * GIB,
        )
    )  # fmt: skip
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.memory_bytes == 6 * GIB
    await arbiter.stop()

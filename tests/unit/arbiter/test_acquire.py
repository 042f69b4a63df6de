"""``await arbiter.acquire``: waiting for memory, order of service, timeouts, cancellation, stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.unit.arbiter.conftest import MakeArbiter
from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.errors import ArbiterTimeout, InsufficientMemory, ShuttingDown
from vramancer.arbiter.types import Allocation, AllocationRequest, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.events import EventBus
from vramancer.units import GIB

LLM = WorkloadType.LLM
BG, NORMAL, HIGH, UF = Priority.BACKGROUND, Priority.NORMAL, Priority.HIGH, Priority.USER_FACING


def req(
    kind: WorkloadType,
    priority: Priority,
    memory: int,
    *,
    device: int | None = None,
    owner: str | None = None,
) -> AllocationRequest:
    """A request; ``device`` is a GPU index."""
    gpu = DeviceId(device) if device is not None else None
    return AllocationRequest(kind, priority, memory, device=gpu, owner=owner)


async def settle() -> None:
    """Let woken tasks run (a few loop turns; no wall-clock wait)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waits_until_memory_is_released() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    holder = arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    waiting = asyncio.create_task(arbiter.acquire(req(LLM, NORMAL, 4 * GIB), timeout_s=10))
    await settle()
    assert not waiting.done()
    assert arbiter.state().waiters == 1
    arbiter.release_allocation(holder.id)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.memory_bytes == 4 * GIB
    assert [a.id for a in arbiter.allocations()] == [granted.id]
    assert arbiter.state().waiters == 0


async def test_times_out_with_a_typed_error() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    with pytest.raises(ArbiterTimeout) as caught:
        await arbiter.acquire(req(LLM, NORMAL, 4 * GIB), timeout_s=0.05)
    assert caught.value.details == {
        "timeout_s": 0.05,
        "requested_bytes": 4 * GIB,
        "available_bytes": 2 * GIB,
        "device": None,
    }
    assert caught.value.http_status == 504
    assert arbiter.state().waiters == 0
    assert arbiter.stats()["denied"]["timeout"] == 1
    assert len(arbiter.allocations()) == 1


async def test_a_request_that_can_never_fit_fails_at_once() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    with pytest.raises(InsufficientMemory) as caught:
        await asyncio.wait_for(arbiter.acquire(req(LLM, UF, 20 * GIB), timeout_s=60), 2)
    assert caught.value.details["requested_bytes"] == 20 * GIB
    assert arbiter.state().waiters == 0


async def test_acquire_preempts_lower_priorities_without_waiting() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    arbiter.allocate(AllocationRequest(LLM, BG, 9 * GIB))
    granted = await asyncio.wait_for(arbiter.acquire(req(LLM, UF, 5 * GIB), timeout_s=0.01), 2)
    assert [a.id for a in arbiter.allocations()] == [granted.id]


async def test_waiters_are_served_by_priority_then_arrival_without_starvation() -> None:
    bus = EventBus()
    arbiter = Arbiter.for_vram_gb(10, events=bus)
    holder = arbiter.allocate(AllocationRequest(LLM, UF, 9 * GIB, preemptible=False))
    a = asyncio.create_task(arbiter.acquire(req(LLM, NORMAL, 6 * GIB, owner="A"), timeout_s=10))
    await settle()
    b = asyncio.create_task(arbiter.acquire(req(LLM, HIGH, 6 * GIB, owner="B"), timeout_s=10))
    await settle()
    # 1 GiB is free, but C queues behind A and B so that they do not starve
    c = asyncio.create_task(arbiter.acquire(req(LLM, BG, 1 * GIB, owner="C"), timeout_s=10))
    await settle()
    assert not any(t.done() for t in (a, b, c))
    arbiter.release_allocation(holder.id)
    got_b = await asyncio.wait_for(b, 5)
    await settle()
    assert not a.done() and not c.done()  # 4 GiB free: A needs 6 and C waits behind A
    arbiter.release_allocation(got_b.id)
    got_a, got_c = await asyncio.wait_for(asyncio.gather(a, c), 5)
    owners = [e.data["owner"] for e in bus.recent(100, kind="allocation_granted")]
    assert owners == [None, "B", "A", "C"]
    assert arbiter.reserved_bytes() == got_a.memory_bytes + got_c.memory_bytes


async def test_a_blocked_waiter_only_holds_back_its_own_device(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB, 10 * GIB)
    await arbiter.start()
    arbiter.allocate(AllocationRequest(LLM, UF, 9 * GIB, device=DeviceId(0), preemptible=False))
    blocked = asyncio.create_task(arbiter.acquire(req(LLM, HIGH, 5 * GIB, device=0), timeout_s=10))
    await settle()
    other = await asyncio.wait_for(arbiter.acquire(req(LLM, BG, 2 * GIB, device=1), timeout_s=1), 2)
    assert other.device == "gpu:1"
    assert not blocked.done()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await arbiter.stop()


async def test_cancelling_a_waiter_leaks_nothing() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    holder = arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    waiting = asyncio.create_task(arbiter.acquire(req(LLM, NORMAL, 4 * GIB), timeout_s=10))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert arbiter.state().waiters == 0
    arbiter.release_allocation(holder.id)
    assert arbiter.allocations() == []


async def test_cancelled_after_the_grant_gives_the_memory_back() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    holder = arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    waiting = asyncio.create_task(arbiter.acquire(req(LLM, NORMAL, 4 * GIB), timeout_s=10))
    await settle()
    arbiter.release_allocation(holder.id)  # grants the waiter and schedules its wake-up ...
    waiting.cancel()  # ... which the cancellation overtakes
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert arbiter.allocations() == []


async def test_stop_fails_waiters_with_shutting_down() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    await arbiter.start()
    arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    waiting = asyncio.create_task(arbiter.acquire(req(LLM, NORMAL, 4 * GIB), timeout_s=10))
    await settle()
    await arbiter.stop()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(waiting, 5)


async def test_a_release_from_another_thread_wakes_the_waiter() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    holder = arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    timer = threading.Timer(0.05, arbiter.release_allocation, args=(holder.id,))
    timer.start()
    granted = await asyncio.wait_for(arbiter.acquire(req(LLM, NORMAL, 4 * GIB), timeout_s=10), 5)
    timer.join()
    assert arbiter.allocations() == [granted]


async def test_reserve_releases_on_exit_even_on_error() -> None:
    arbiter = Arbiter.for_vram_gb(10)
    seen: list[Allocation] = []
    with pytest.raises(RuntimeError):
        async with arbiter.reserve(req(LLM, HIGH, 3 * GIB, owner="task:1")) as allocation:
            seen.append(allocation)
            assert arbiter.reserved_bytes() == 3 * GIB
            raise RuntimeError("the task failed")
    assert seen[0].owner == "task:1"
    assert arbiter.allocations() == []

"""The arbiter service: budget detection, typed errors, preemption side effects, metrics, stats."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.arbiter.conftest import FixedDevices, MakeArbiter
from vramancer import errors
from vramancer import event_types as ev
from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.errors import (
    InsufficientMemory,
    InsufficientQuality,
    Preempted,
    ShuttingDown,
)
from vramancer.arbiter.types import Allocation, AllocationRequest, Priority, WorkloadType
from vramancer.clock import ManualClock
from vramancer.devices.ids import CPU, DeviceId
from vramancer.events import Event, EventBus
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB, MIB

LLM, IMAGE = WorkloadType.LLM, WorkloadType.IMAGE
BG, NORMAL, HIGH, UF = Priority.BACKGROUND, Priority.NORMAL, Priority.HIGH, Priority.USER_FACING


def kinds(bus: EventBus, kind: str) -> list[Event]:
    return bus.recent(1000, kind=kind)


# --------------------------------------------------------------------------- budget


async def test_budget_is_ninety_percent_of_each_gpu(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(24 * GIB, 12 * GIB)
    await arbiter.start()
    state = arbiter.state()
    assert state.budget_bytes == int(24 * GIB * 0.9) + int(12 * GIB * 0.9)
    assert [(d.device, d.budget_bytes) for d in state.devices] == [
        ("gpu:0", int(24 * GIB * 0.9)),
        ("gpu:1", int(12 * GIB * 0.9)),
    ]
    assert state.allocated_bytes == 0 and state.available_bytes == state.budget_bytes
    await arbiter.stop()


async def test_given_budget_and_fraction_from_settings(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB, budget="4GiB", usable_fraction=0.5)
    await arbiter.start()
    assert arbiter.budget.total_bytes == 4 * GIB
    assert arbiter.budget.devices == {"gpu:0": 5 * GIB}


def test_no_gpu_means_no_budget(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter()
    with pytest.raises(InsufficientMemory) as caught:
        arbiter.allocate(AllocationRequest(LLM, NORMAL, GIB))
    assert caught.value.details["requested_bytes"] == GIB
    assert caught.value.details["available_bytes"] == 0
    assert caught.value.http_status == 409
    assert arbiter.recommended_quality(LLM) == pytest.approx(0.4)  # zero budget: full pressure


def test_for_vram_gb_gives_exactly_that_budget() -> None:
    arbiter = Arbiter.for_vram_gb(24)
    assert arbiter.state().budget_bytes == 24 * GIB
    assert arbiter.budget.devices == {}
    # the quality-balancing example: two workloads share one GPU
    llm = arbiter.allocate(AllocationRequest(LLM, HIGH, 10 * GIB))
    assert llm.quality_target == 1.0
    image = arbiter.allocate(AllocationRequest(IMAGE, NORMAL, 8 * GIB))
    state = arbiter.state()
    assert state.active[LLM] == 1 and state.active[IMAGE] == 1
    assert arbiter.recommended_quality(LLM, HIGH) >= arbiter.recommended_quality(IMAGE, NORMAL)
    assert image.quality_target < 1.0
    with pytest.raises(InsufficientMemory):
        Arbiter.for_vram_gb(8).allocate(AllocationRequest(LLM, HIGH, 100 * GIB))


async def test_device_budget_is_checked(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB, 10 * GIB)
    await arbiter.start()
    first = arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB, device=DeviceId(0)))
    assert first.device == "gpu:0"
    with pytest.raises(InsufficientMemory) as caught:
        arbiter.allocate(AllocationRequest(LLM, NORMAL, 2 * GIB, device=DeviceId(0)))
    assert caught.value.details["available_bytes"] == 1 * GIB
    assert caught.value.details["device"] == "gpu:0"
    second = arbiter.allocate(AllocationRequest(LLM, NORMAL, 2 * GIB, device=DeviceId(1)))
    assert second.device == "gpu:1"
    third = arbiter.allocate(AllocationRequest(LLM, NORMAL, 1 * GIB))  # no device: the total only
    assert arbiter.reserved_bytes(DeviceId(0)) == 8 * GIB
    assert arbiter.reserved_bytes(DeviceId(1)) == 2 * GIB
    assert arbiter.reserved_bytes() == 11 * GIB
    assert third.device is None
    with pytest.raises(errors.InvalidInput, match="gpu:5"):
        arbiter.allocate(AllocationRequest(LLM, NORMAL, GIB, device=DeviceId(5)))


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"memory_bytes": 0}, "memory"),
        ({"memory_bytes": -5}, "memory"),
        ({"min_quality": 1.5}, "min_quality"),
        ({"min_quality": 0.0}, "min_quality"),
        ({"device": CPU}, "device"),
    ],
)
def test_a_bad_request_is_a_typed_error_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"workload_type": LLM, "priority": NORMAL, "memory_bytes": GIB}
    args.update(kwargs)
    with pytest.raises(errors.InvalidInput) as caught:
        AllocationRequest(**args)  # type: ignore[arg-type]
    assert caught.value.details["field"] == field
    assert caught.value.http_status == 422


def test_device_names_in_any_input_form_answer_gpu_n(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(8 * GIB)
    granted = arbiter.allocate(
        AllocationRequest(WorkloadType.EMBEDDING, UF, 512 * MIB, device=DeviceId.parse("cuda:0"))
    )
    assert granted.workload_type is WorkloadType.EMBEDDING
    assert granted.memory_bytes == 512 * MIB
    assert granted.device == "gpu:0"
    typed = arbiter.allocate(AllocationRequest(LLM, NORMAL, MIB, device=DeviceId(0)))
    assert typed.device == "gpu:0"
    assert arbiter.reserved_bytes(DeviceId(0)) == 513 * MIB


# --------------------------------------------------------------------------- preemption


def test_preemption_tells_the_holder_by_callback_and_event(
    make_arbiter: MakeArbiter, bus: EventBus
) -> None:
    arbiter = make_arbiter(10 * GIB)  # budget 9 GiB
    told: list[Allocation] = []
    victim = arbiter.allocate(
        AllocationRequest(IMAGE, BG, 6 * GIB, owner="model:sdxl", on_preempt=told.append)
    )
    keeper = arbiter.allocate(AllocationRequest(LLM, HIGH, 2 * GIB, owner="model:qwen"))
    winner = arbiter.allocate(AllocationRequest(LLM, UF, 4 * GIB, owner="user"))
    assert told == [victim]
    assert [a.id for a in arbiter.allocations()] == [keeper.id, winner.id]
    (event,) = kinds(bus, "preempted")
    assert event.data == {
        "allocation_id": victim.id,
        "owner": "model:sdxl",
        "workload_type": "image",
        "priority": "background",
        "memory_bytes": 6 * GIB,
        "device": None,
        "reason": "preempted",
        "by": winner.id,
        "by_priority": "user_facing",
        "by_owner": "user",
    }
    with pytest.raises(Preempted) as caught:
        arbiter.get(victim.id)
    assert caught.value.details["by"] == winner.id
    assert caught.value.http_status == 409
    arbiter.release_allocation(victim)  # the holder's clean-up after preemption: no error
    assert arbiter.stats()["preemptions"] == 1


def test_never_evict_holders_and_equal_priorities_are_not_preempted(
    make_arbiter: MakeArbiter,
) -> None:
    arbiter = make_arbiter(10 * GIB)
    arbiter.allocate(AllocationRequest(LLM, BG, 4 * GIB, preemptible=False))
    arbiter.allocate(AllocationRequest(LLM, HIGH, 4 * GIB))
    with pytest.raises(InsufficientMemory) as caught:
        arbiter.allocate(AllocationRequest(LLM, HIGH, 2 * GIB))
    assert caught.value.details["reclaimable_bytes"] == 0
    assert len(arbiter.allocations()) == 2


def test_preemption_can_be_turned_off(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB, preemption=False)
    arbiter.allocate(AllocationRequest(LLM, BG, 8 * GIB))
    with pytest.raises(InsufficientMemory):
        arbiter.allocate(AllocationRequest(LLM, UF, 2 * GIB))


def test_a_failing_callback_does_not_break_the_grant(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB)

    def boom(_: Allocation) -> None:
        raise RuntimeError("holder crashed")

    arbiter.allocate(AllocationRequest(LLM, BG, 8 * GIB, on_preempt=boom))
    granted = arbiter.allocate(AllocationRequest(LLM, UF, 8 * GIB))
    assert [a.id for a in arbiter.allocations()] == [granted.id]


def test_callback_may_call_back_into_the_arbiter(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB)
    seen: list[int] = []
    arbiter.allocate(
        AllocationRequest(
            LLM, BG, 8 * GIB, on_preempt=lambda a: seen.append(arbiter.reserved_bytes())
        )
    )
    arbiter.allocate(AllocationRequest(LLM, UF, 8 * GIB))
    assert seen == [8 * GIB]  # the callback runs after the new grant, outside the lock


# --------------------------------------------------------------------------- quality


def test_quality_falls_with_pressure_and_recovers_on_release(make_arbiter: MakeArbiter) -> None:
    arbiter = Arbiter.for_vram_gb(10)
    assert arbiter.recommended_quality(LLM) == 1.0
    big = arbiter.allocate(AllocationRequest(IMAGE, NORMAL, 9 * GIB))
    squeezed = arbiter.recommended_quality(LLM)
    assert 0.4 <= squeezed < 1.0
    assert arbiter.state().qualities[LLM] == squeezed
    arbiter.release_allocation(big.id)
    assert arbiter.recommended_quality(LLM) == 1.0
    assert arbiter.state().pressure_ratio == 0.0


def test_insufficient_quality_is_typed(make_arbiter: MakeArbiter) -> None:
    arbiter = Arbiter.for_vram_gb(10)
    arbiter.allocate(AllocationRequest(LLM, HIGH, 8 * GIB))
    with pytest.raises(InsufficientQuality) as caught:
        arbiter.allocate(AllocationRequest(LLM, NORMAL, 1 * GIB, min_quality=0.95))
    assert caught.value.details["minimum_quality"] == 0.95
    assert 0.4 <= caught.value.details["available_quality"] < 0.95
    assert caught.value.http_status == 409
    assert arbiter.stats()["denied"]["quality"] == 1


# --------------------------------------------------------------------------- release, stop


def test_release_unknown_or_twice_is_not_found(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(8 * GIB)
    held = arbiter.allocate(AllocationRequest(LLM, NORMAL, GIB))
    arbiter.release_allocation(held.id)
    with pytest.raises(errors.NotFound):
        arbiter.release_allocation(held.id)
    with pytest.raises(errors.NotFound):
        arbiter.release_allocation("alloc-999")
    with pytest.raises(errors.NotFound):
        arbiter.get("alloc-999")


async def test_requests_after_stop_are_refused(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(8 * GIB)
    await arbiter.start()
    held = arbiter.allocate(AllocationRequest(LLM, NORMAL, GIB))
    await arbiter.stop()
    with pytest.raises(ShuttingDown) as caught:
        arbiter.allocate(AllocationRequest(LLM, NORMAL, GIB))
    assert caught.value.http_status == 503
    assert isinstance(caught.value, errors.ShuttingDown)
    with pytest.raises(ShuttingDown):
        await arbiter.acquire(AllocationRequest(LLM, NORMAL, GIB), timeout_s=0.01)
    arbiter.release_allocation(held.id)  # holders may still give memory back
    assert arbiter.state().shutting_down
    await arbiter.start()
    arbiter.allocate(AllocationRequest(LLM, NORMAL, GIB))


# --------------------------------------------------------------------------- budget changes


def _gpu_removed(index: int) -> ev.DeviceChanged:
    return ev.DeviceChanged(
        change="removed",
        index=index,
        uuid=f"GPU-{index}",
        name=f"sim{index}",
        backend="simulated",
        simulated=True,
        error=None,
    )


async def test_device_changed_refreshes_the_budget_and_preempts_what_no_longer_fits(
    make_arbiter: MakeArbiter, bus: EventBus
) -> None:
    devices = FixedDevices(10 * GIB, 10 * GIB)
    arbiter = make_arbiter(devices=devices)
    await arbiter.start()
    keep = arbiter.allocate(AllocationRequest(LLM, UF, 4 * GIB, device=DeviceId(0)))
    small = arbiter.allocate(AllocationRequest(LLM, BG, 4 * GIB, device=DeviceId(0)))
    gone = arbiter.allocate(AllocationRequest(LLM, HIGH, 2 * GIB, device=DeviceId(1)))
    devices.gpu_bytes = [5 * GIB]  # gpu:1 vanished, gpu:0 now reports 5 GiB
    bus.publish(_gpu_removed(1))
    assert [a.id for a in arbiter.allocations()] == [keep.id]
    preempted = kinds(bus, "preempted")
    assert [(e.data["allocation_id"], e.data["reason"]) for e in preempted] == [
        (gone.id, "budget_shrunk"),
        (small.id, "budget_shrunk"),
    ]
    assert kinds(bus, "arbiter_budget_changed")[-1].data["budget_bytes"] == int(5 * GIB * 0.9)
    await arbiter.stop()
    reads = devices.calls
    bus.publish(_gpu_removed(1))  # unsubscribed: no refresh any more
    assert devices.calls == reads


# --------------------------------------------------------------------------- metrics, stats


def test_metrics_follow_the_state(make_arbiter: MakeArbiter, metrics: Metrics) -> None:
    arbiter = make_arbiter(10 * GIB)
    arbiter.allocate(AllocationRequest(LLM, BG, 6 * GIB))
    arbiter.allocate(AllocationRequest(LLM, HIGH, 2 * GIB))
    arbiter.allocate(AllocationRequest(LLM, UF, 3 * GIB))  # preempts the background one
    with pytest.raises(InsufficientMemory):
        arbiter.allocate(AllocationRequest(LLM, NORMAL, 8 * GIB))
    samples = {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node"))): (
            sample.value
        )
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    assert samples[("vramancer_arbiter_budget_bytes", ())] == int(10 * GIB * 0.9)
    assert samples[("vramancer_arbiter_allocated_bytes", ())] == 5 * GIB
    assert samples[("vramancer_arbiter_pressure_ratio", ())] == pytest.approx(5 / 9)
    assert samples[("vramancer_arbiter_allocations", (("priority", "high"),))] == 1
    assert samples[("vramancer_arbiter_allocations", (("priority", "background"),))] == 0
    preemptions = ("vramancer_arbiter_preemptions_total", (("priority", "background"),))
    assert samples[preemptions] == 1
    assert samples[("vramancer_arbiter_denials_total", (("reason", "memory"),))] == 1
    assert samples[("vramancer_arbiter_denials_total", (("reason", "quality"),))] == 0


def test_stats_count_what_happened(make_arbiter: MakeArbiter, clock: ManualClock) -> None:
    arbiter = Arbiter.for_vram_gb(10, clock=clock)
    a = arbiter.allocate(AllocationRequest(LLM, NORMAL, 2 * GIB))
    arbiter.allocate(AllocationRequest(IMAGE, NORMAL, 7 * GIB))
    with pytest.raises(InsufficientMemory):
        arbiter.allocate(AllocationRequest(IMAGE, NORMAL, 7 * GIB))
    arbiter.release_allocation(a)
    clock.advance(5)
    stats = arbiter.stats()
    assert stats["total_allocations"] == 3
    assert stats["successful_allocations"] == 2
    assert stats["failed_allocations"] == 1
    assert stats["released"] == 1
    assert stats["quality_reductions"] == 1
    assert stats["peak_allocated_bytes"] == 9 * GIB
    assert stats["avg_memory_pressure"] == pytest.approx((0.2 + 0.9) / 2)
    assert stats["avg_quality"]["llm"] == 1.0
    assert stats["uptime_s"] == 5


# --------------------------------------------------------------------------- threads


def test_concurrent_threads_never_oversubscribe(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(4 * GIB, 4 * GIB)
    budget = arbiter.budget
    violations: list[str] = []
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(150):
            priority = list(Priority)[(n + i) % 4]
            try:
                held = arbiter.allocate(
                    AllocationRequest(
                        LLM,
                        priority,
                        (1 + (i % 5)) * 256 * MIB,
                        device=[None, DeviceId(0), DeviceId(1)][i % 3],
                    )
                )
            except InsufficientMemory:
                continue
            if arbiter.reserved_bytes() > budget.total_bytes:
                violations.append("total")
            arbiter.release_allocation(held.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == []
    assert arbiter.reserved_bytes() == 0
    stats = arbiter.stats()
    assert stats["successful_allocations"] == stats["released"] + stats["preemptions"]


def test_preemption_can_be_switched_off_and_on_for_one_holder(make_arbiter: MakeArbiter) -> None:
    arbiter = make_arbiter(10 * GIB)
    held = arbiter.allocate(AllocationRequest(LLM, BG, 8 * GIB))
    assert arbiter.set_preemptible(held.id, False) is True
    with pytest.raises(InsufficientMemory) as caught:
        arbiter.allocate(AllocationRequest(LLM, UF, 8 * GIB))
    assert caught.value.details["reclaimable_bytes"] == 0
    assert arbiter.get(held.id).preemptible is False
    assert arbiter.set_preemptible(held.id, True) is True
    winner = arbiter.allocate(AllocationRequest(LLM, UF, 8 * GIB))
    assert [a.id for a in arbiter.allocations()] == [winner.id]
    assert arbiter.set_preemptible(held.id, False) is False  # preempted: not live any more
    assert arbiter.set_preemptible("alloc-999", False) is False

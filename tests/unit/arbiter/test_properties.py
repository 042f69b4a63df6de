"""The arbiter's invariants as hypothesis properties over random request/release sequences.

* allocated ≤ budget at all times, in all and per GPU;
* preemption only takes from strictly lower priorities (and never a never-evict holder);
* at equal pressure a higher priority never gets a lower quality;
* releasing restores quality (exactly, when the request preempted nobody).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import pytest
from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.arbiter.conftest import FixedDevices
from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.errors import InsufficientMemory, InsufficientQuality
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.arbiter.types import AllocationRequest, Priority, WorkloadType
from vramancer.clock import ManualClock
from vramancer.devices.ids import DeviceId
from vramancer.events import Event, EventBus
from vramancer.observability.metrics import Metrics
from vramancer.units import MIB


@dataclass(frozen=True)
class Request:
    kind: WorkloadType
    priority: Priority
    mib: int
    device: DeviceId | None
    min_quality: float | None
    preemptible: bool


@dataclass(frozen=True)
class Release:
    pick: int


requests = st.builds(
    Request,
    kind=st.sampled_from(list(WorkloadType)),
    priority=st.sampled_from(list(Priority)),
    mib=st.integers(min_value=1, max_value=14).map(lambda n: n * 50),
    device=st.one_of(st.none(), st.integers(min_value=0, max_value=1).map(DeviceId)),
    min_quality=st.one_of(st.none(), st.floats(min_value=0.3, max_value=1.0)),
    preemptible=st.booleans(),
)
releases = st.builds(Release, pick=st.integers(min_value=0, max_value=50))
operations = st.lists(st.one_of(requests, releases), min_size=10, max_size=40)


def build(gpus: tuple[int, ...] = (1000 * MIB, 600 * MIB), bus: EventBus | None = None) -> Arbiter:
    clock = ManualClock()
    return Arbiter(
        ArbiterSettings(),
        devices=FixedDevices(*gpus),
        events=bus if bus is not None else EventBus(clock=clock.time),
        metrics=Metrics(node="prop"),
        clock=clock,
    )


def check_budget(arbiter: Arbiter) -> None:
    state = arbiter.state()
    assert state.allocated_bytes <= state.budget_bytes
    assert state.allocated_bytes == sum(a.memory_bytes for a in state.allocations)
    for device in state.devices:
        assert device.allocated_bytes <= device.budget_bytes
    assert arbiter.reserved_bytes() == state.allocated_bytes


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(operations)
def test_random_sequences_keep_every_invariant(ops: list[Request | Release]) -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append, "preempted")
    arbiter = build(bus=bus)
    called: list[str] = []
    for op in ops:
        if isinstance(op, Release):
            live = arbiter.allocations()
            if live:
                arbiter.release_allocation(live[op.pick % len(live)].id)
            check_budget(arbiter)
            continue
        before = {a.id for a in arbiter.allocations()}
        try:
            granted = arbiter.allocate(
                AllocationRequest(
                    op.kind,
                    op.priority,
                    op.mib * MIB,
                    device=op.device,
                    min_quality=op.min_quality,
                    preemptible=op.preemptible,
                    on_preempt=lambda victim: called.append(victim.id),
                )
            )
        except (InsufficientMemory, InsufficientQuality):
            assert {a.id for a in arbiter.allocations()} == before  # a refusal changes nothing
        else:
            if op.min_quality is not None:
                assert granted.quality_target >= op.min_quality - 1e-9
            taken = before - {a.id for a in arbiter.allocations()}
            assert taken == {e.data["allocation_id"] for e in events if e.data["by"] == granted.id}
        check_budget(arbiter)
    assert called == [e.data["allocation_id"] for e in events]  # every holder was told
    note_event("preemptions" if events else "no preemption")
    for event in events:
        assert Priority(event.data["priority"]).rank < Priority(event.data["by_priority"]).rank
        assert event.data["reason"] == "preempted"


@settings(max_examples=150, deadline=None)
@given(st.lists(requests, max_size=12), requests)
def test_releasing_restores_quality(setup: list[Request], probe: Request) -> None:
    arbiter = build()
    for op in setup:
        with contextlib.suppress(InsufficientMemory):
            arbiter.allocate(
                AllocationRequest(op.kind, op.priority, op.mib * MIB, device=op.device)
            )
    before = {(k, p): arbiter.recommended_quality(k, p) for k in WorkloadType for p in Priority}
    live_before = len(arbiter.allocations())
    try:
        granted = arbiter.allocate(
            AllocationRequest(probe.kind, probe.priority, probe.mib * MIB, device=probe.device)
        )
    except InsufficientMemory:
        return
    during = {(k, p): arbiter.recommended_quality(k, p) for k in WorkloadType for p in Priority}
    arbiter.release_allocation(granted.id)
    after = {(k, p): arbiter.recommended_quality(k, p) for k in WorkloadType for p in Priority}
    preempted_someone = len(arbiter.allocations()) < live_before
    for key in before:
        assert after[key] >= during[key]
        if preempted_someone:
            assert after[key] >= before[key]
        else:
            assert after[key] == before[key]


@settings(max_examples=100, deadline=None)
@given(st.lists(requests, max_size=12), st.sampled_from(list(WorkloadType)))
def test_at_equal_pressure_higher_priority_never_gets_lower_quality(
    setup: list[Request], kind: WorkloadType
) -> None:
    arbiter = build()
    for op in setup:
        with contextlib.suppress(InsufficientMemory):
            arbiter.allocate(AllocationRequest(op.kind, op.priority, op.mib * MIB, preempt=False))
    ordered = sorted(Priority, key=lambda p: p.rank)
    qualities = [arbiter.recommended_quality(kind, p) for p in ordered]
    assert qualities == sorted(qualities)
    # the grant itself: the same request at two priorities on two identical arbiters
    for low, high in itertools.pairwise(ordered):
        a, b = build(), build()
        for arb in (a, b):
            arb.allocate(AllocationRequest(WorkloadType.OTHER, Priority.USER_FACING, 900 * MIB))
        q_low = a.allocate(AllocationRequest(kind, low, 300 * MIB, preempt=False)).quality_target
        q_high = b.allocate(AllocationRequest(kind, high, 300 * MIB, preempt=False)).quality_target
        assert q_high >= q_low

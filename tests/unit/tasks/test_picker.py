"""The device picker: eligibility, scores, strategies, pins, and properties over random views."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
from vramancer.tasks.picker import (
    HOST,
    DeviceView,
    LocalLoad,
    NoRoom,
    PickerPolicy,
    Placement,
    assume,
    build_views,
    drained,
    hold,
    ineligibility,
    pick,
)
from vramancer.tasks.settings import PickerStrategy

GIB = 1024**3
SPREAD = PickerPolicy()
BINPACK = PickerPolicy(strategy=PickerStrategy.BINPACK)


def gpu(
    index: int, total_gib: float = 24, free_gib: float | None = None, **kw: object
) -> DeviceView:
    total = int(total_gib * GIB)
    free = total if free_gib is None else int(free_gib * GIB)
    fields: dict[str, object] = {
        "device": f"gpu:{index}",
        "index": index,
        "total_bytes": total,
        "free_bytes": free,
        "grantable_bytes": int(total * 0.9),
        "utilization_ratio": 0.0,
        "temperature_celsius": 40.0,
    }
    fields.update(kw)
    return DeviceView(**fields)  # type: ignore[arg-type]


def test_each_rule_makes_a_device_ineligible_with_its_reason() -> None:
    assert ineligibility(gpu(0), GIB, SPREAD) is None
    assert ineligibility(gpu(0, age_s=15.5), 0, SPREAD) == "no telemetry for 16 s (TTL 15 s)"
    assert ineligibility(gpu(0, temperature_celsius=79.0), 0, SPREAD) == "too hot (79 °C > 78 °C)"
    assert ineligibility(gpu(0, temperature_celsius=78.0), 0, SPREAD) is None
    assert ineligibility(gpu(0, utilization_ratio=0.96), 0, SPREAD) == "too busy (96% > 95%)"
    assert ineligibility(gpu(0, running=1), 0, SPREAD) == "all 1 slots in use"
    why = ineligibility(gpu(0, free_gib=3), 4 * GIB, SPREAD)
    assert why == "needs 4.0 GiB, 3.0 GiB available after reservations"
    # The arbiter's room bounds it too, whatever the driver shows.
    assert ineligibility(gpu(0, grantable_bytes=GIB), 2 * GIB, SPREAD) is not None


def test_unknown_telemetry_is_eligible() -> None:
    view = gpu(0, utilization_ratio=None, temperature_celsius=None)
    assert ineligibility(view, GIB, SPREAD) is None


def test_spread_prefers_an_idle_device_over_the_one_with_most_free_vram() -> None:
    big_busy = gpu(0, total_gib=48, utilization_ratio=0.30)
    small_idle = gpu(1, total_gib=8)
    assert pick([big_busy, small_idle], GIB, None, SPREAD) == Placement("gpu:1", 1, 20.0)


def test_spread_among_busy_devices_takes_the_lowest_score() -> None:
    warm = gpu(0, utilization_ratio=0.5, temperature_celsius=70)
    cool = gpu(1, utilization_ratio=0.5, temperature_celsius=50)
    stale = gpu(2, utilization_ratio=0.5, temperature_celsius=40, age_s=10)
    decision = pick([warm, cool, stale], GIB, None, SPREAD)
    assert isinstance(decision, Placement)
    assert decision.device == "gpu:1"  # 50+25 < 50+20+30 (stale) and < 50+35


def test_spread_breaks_ties_by_free_vram() -> None:
    a = gpu(0, total_gib=8)
    b = gpu(1, total_gib=16)
    decision = pick([a, b], GIB, None, SPREAD)
    assert isinstance(decision, Placement) and decision.device == "gpu:1"


def test_our_own_running_task_makes_a_device_not_idle() -> None:
    busy_ours = gpu(0, running=1, slots=2)
    other = gpu(1, total_gib=8)
    decision = pick([busy_ours, other], GIB, None, SPREAD)
    assert isinstance(decision, Placement) and decision.device == "gpu:1"


def test_binpack_takes_the_tightest_fit() -> None:
    views = [gpu(0, total_gib=48), gpu(1, total_gib=12), gpu(2, total_gib=24)]
    decision = pick(views, 4 * GIB, None, BINPACK)
    assert isinstance(decision, Placement) and decision.device == "gpu:1"
    decision = pick(views, 20 * GIB, None, BINPACK)
    assert isinstance(decision, Placement) and decision.device == "gpu:2"


def test_a_pin_only_considers_that_gpu() -> None:
    views = [gpu(0), gpu(1, temperature_celsius=90)]
    assert pick(views, 0, 1, SPREAD) == NoRoom((("gpu:1", "too hot (90 °C > 78 °C)"),))
    assert pick(views, 0, 7, SPREAD) == NoRoom((("gpu:7", "no such GPU"),))
    decision = pick(views, 0, 0, SPREAD)
    assert isinstance(decision, Placement) and decision.device == "gpu:0"


def test_assume_counts_a_just_placed_task_before_the_driver_sees_it() -> None:
    views = [gpu(0, slots=4)]
    placed = pick(views, 10 * GIB, None, SPREAD)
    assert isinstance(placed, Placement)
    after = assume(views, placed, 10 * GIB)
    assert after[0].running == 1
    assert after[0].available_bytes == int(24 * 0.9 * GIB) - 10 * GIB
    assert after[0].free_bytes == views[0].free_bytes  # the driver has not seen it
    assert isinstance(pick(after, 10 * GIB, None, SPREAD), Placement)
    twice = assume(after, placed, 10 * GIB)
    assert isinstance(pick(twice, 10 * GIB, None, SPREAD), NoRoom)


def test_no_room_message_names_every_device() -> None:
    decision = pick([gpu(0, running=1), gpu(1, age_s=99)], 0, None, SPREAD)
    assert isinstance(decision, NoRoom)
    assert decision.message() == (
        "gpu:0: all 1 slots in use; gpu:1: no telemetry for 99 s (TTL 15 s)"
    )


def _host() -> HostSnapshot:
    return HostSnapshot(
        cpu_count=2,
        cpu_utilization_ratio=0.0,
        memory_total_bytes=8 * GIB,
        memory_available_bytes=4 * GIB,
        memory_used_bytes=4 * GIB,
        swap_total_bytes=0,
        swap_used_bytes=0,
    )


def test_build_views_of_gpus_and_of_a_cpu_only_machine() -> None:
    nvidia = GpuSnapshot(
        index=0,
        uuid="GPU-1",
        name="A",
        vendor=DeviceVendor.NVIDIA,
        memory_total_bytes=24 * GIB,
        memory_used_bytes=4 * GIB,
        memory_free_bytes=20 * GIB,
        utilization_ratio=0.1,
        temperature_celsius=50,
        taken_at=100.0,
        cuda_index=3,
    )
    sim = GpuSnapshot(
        index=1,
        uuid="sim-x",
        name="x",
        vendor=DeviceVendor.SIMULATED,
        memory_total_bytes=8 * GIB,
        memory_used_bytes=0,
        memory_free_bytes=8 * GIB,
        taken_at=90.0,
        cuda_index=1,
        error="poll failed",
    )
    snap = SystemSnapshot(host=_host(), gpus=(nvidia, sim))
    views = build_views(
        snap,
        101.0,
        grantable={"gpu:0": 10 * GIB},
        local={"gpu:0": LocalLoad(1, GIB)},
        slots_per_device=2,
        host_slots=3,
    )
    assert views[0] == DeviceView(
        device="gpu:0",
        index=0,
        total_bytes=24 * GIB,
        free_bytes=20 * GIB,
        grantable_bytes=10 * GIB,
        unseen_bytes=GIB,
        utilization_ratio=0.1,
        temperature_celsius=50,
        age_s=1.0,
        error=False,
        running=1,
        slots=2,
        cuda_index=3,
    )
    assert views[0].available_bytes == 10 * GIB
    assert views[1].cuda_index is None  # simulated: no CUDA device for the task
    assert views[1].grantable_bytes == 0 and views[1].error and views[1].age_s == 11.0
    cpu_only = build_views(
        SystemSnapshot(host=_host()),
        0.0,
        grantable={},
        local={HOST: LocalLoad(2, 0)},
        slots_per_device=1,
        host_slots=3,
    )
    assert [(v.device, v.running, v.slots) for v in cpu_only] == [(HOST, 2, 3)]
    assert isinstance(pick(cpu_only, 0, None, SPREAD), Placement)
    assert isinstance(pick(cpu_only, 1, None, SPREAD), NoRoom)


# --------------------------------------------------------------------------- properties


def _view(
    i: int,
    total: int,
    used: int,
    grant_frac: float,
    busy: float | None,
    temp: float | None,
    age: float,
    running: int,
    slots: int,
) -> DeviceView:
    return DeviceView(
        device=f"gpu:{i}",
        index=i,
        total_bytes=total,
        free_bytes=total - min(used, total),
        grantable_bytes=int(total * grant_frac),
        utilization_ratio=busy,
        temperature_celsius=temp,
        age_s=age,
        running=min(running, slots),
        slots=slots,
    )


device_rows = st.tuples(
    st.integers(1 * GIB, 80 * GIB),
    st.integers(0, 80 * GIB),
    st.floats(0, 1),
    st.one_of(st.none(), st.floats(0, 1)),
    st.one_of(st.none(), st.floats(20, 100)),
    st.floats(0, 30),
    st.integers(0, 4),
    st.integers(1, 4),
)
views_strategy = st.lists(device_rows, max_size=8).map(
    lambda rows: [_view(i, *row) for i, row in enumerate(rows)]
)


needs = st.lists(st.integers(0, 40 * GIB), min_size=1, max_size=12)
policies = st.builds(
    PickerPolicy,
    strategy=st.sampled_from(list(PickerStrategy)),
    max_busy_ratio=st.floats(0.5, 1.0),
    max_temperature_celsius=st.floats(60, 90),
)


@settings(max_examples=300, deadline=None)
@given(
    views=views_strategy,
    needs=needs,
    policy=policies,
    pin=st.one_of(st.none(), st.integers(0, 9)),
)
def test_properties_eligible_complete_pinned_and_never_oversubscribed(
    views: list[DeviceView], needs: list[int], policy: PickerPolicy, pin: int | None
) -> None:
    start = {v.device: v for v in views}
    placed: dict[str, int] = {}
    current = list(views)
    for need in needs:
        decision = pick(current, need, pin, policy)
        considered = [v for v in current if pin is None or v.index == pin]
        eligible = [v for v in considered if ineligibility(v, need, policy) is None]
        if isinstance(decision, NoRoom):
            assert not eligible  # complete: no room only when no device can take it
            continue
        chosen = next(v for v in current if v.device == decision.device)
        assert ineligibility(chosen, need, policy) is None  # never an ineligible device
        if pin is not None:
            assert decision.index == pin  # pins honoured
        placed[decision.device] = placed.get(decision.device, 0) + need
        current = assume(current, decision, need)
    for device, total_need in placed.items():
        before = start[device]
        # Never oversubscribed: what was placed fits in what was available, and in the slots.
        assert total_need <= before.available_bytes
        after = next(v for v in current if v.device == device)
        assert after.running <= after.slots


def test_drained_gives_back_our_slots_and_reservations() -> None:
    # 4 GiB of ours, 1 GiB of it already visible to the driver; someone else uses 10 GiB.
    view = gpu(0, free_gib=13, grantable_bytes=6 * GIB, running=2, slots=2)
    view = replace(view, own_bytes=4 * GIB, unseen_bytes=3 * GIB)
    assert view.available_bytes == 6 * GIB
    empty = drained(view)
    assert (empty.running, empty.own_bytes, empty.unseen_bytes) == (0, 0, 0)
    assert empty.free_bytes == 14 * GIB  # the visible GiB of ours comes back
    assert empty.grantable_bytes == 10 * GIB
    assert empty.available_bytes == 10 * GIB


def test_hold_takes_the_device_that_fits_once_drained_and_blocks_it() -> None:
    full_of_ours = replace(  # one task of ours, 16 GiB, not yet seen by the driver
        gpu(0, running=1),
        own_bytes=16 * GIB,
        unseen_bytes=16 * GIB,
        grantable_bytes=int(24 * 0.9 * GIB) - 16 * GIB,
    )
    other = gpu(1, total_gib=8)
    views = [full_of_ours, other]
    assert isinstance(pick(views, 12 * GIB, None, SPREAD), NoRoom)
    held, device = hold(views, 12 * GIB, None, "big", SPREAD)
    assert device == "gpu:0"
    assert [v.held_for for v in held] == ["big", None]
    small = pick(held, GIB, None, SPREAD)
    assert isinstance(small, Placement) and small.device == "gpu:1"
    assert ineligibility(held[0], GIB, SPREAD) == "held for task big, which has waited longest"
    # Someone else's VRAM or heat: draining our tasks would not help, nothing is held.
    hot = gpu(0, temperature_celsius=90)
    assert hold([hot], GIB, None, "t", SPREAD) == ([hot], None)
    foreign = gpu(0, free_gib=4)
    assert hold([foreign], 8 * GIB, None, "t", SPREAD) == ([foreign], None)
    # A pin holds only its own GPU.
    _, pinned = hold(views, 4 * GIB, 1, "p", SPREAD)
    assert pinned == "gpu:1"


@settings(max_examples=200, deadline=None)
@given(
    views=views_strategy,
    held=st.lists(st.booleans(), max_size=8),
    needs=needs,
    policy=policies,
)
def test_properties_a_held_device_never_takes_another_task(
    views: list[DeviceView], held: list[bool], needs: list[int], policy: PickerPolicy
) -> None:
    current = [
        replace(v, held_for="old") if i < len(held) and held[i] else v for i, v in enumerate(views)
    ]
    for need in needs:
        decision = pick(current, need, None, policy)
        if isinstance(decision, Placement):
            chosen = next(v for v in current if v.device == decision.device)
            assert chosen.held_for is None
            current = assume(current, decision, need)
        after, device = hold(current, need, None, "new", policy)
        if device is not None:
            before = next(v for v in current if v.device == device)
            assert before.held_for is None  # never steals another task's hold
            assert ineligibility(drained(before), need, policy) is None  # it would fit
            current = after


def test_a_node_pin_only_considers_that_nodes_gpus() -> None:
    views = [
        gpu(0, device="a/gpu:0", node="a", free_gib=2),
        gpu(0, device="b/gpu:0", node="b"),
        gpu(1, device="b/gpu:1", node="b", temperature_celsius=90),
    ]
    decision = pick(views, GIB, None, SPREAD, "a")
    assert isinstance(decision, Placement) and decision.device == "a/gpu:0"
    assert pick(views, 0, 1, SPREAD, "b") == NoRoom((("b/gpu:1", "too hot (90 °C > 78 °C)"),))
    assert pick(views, 0, None, SPREAD, "c") == NoRoom((("c", "no live GPU on this node"),))
    free = pick(views, GIB, None, SPREAD)
    assert isinstance(free, Placement) and free.device == "b/gpu:0"

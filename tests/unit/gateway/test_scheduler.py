"""The gateway's pure plan: admissions, grouping before swapping, bounded waits, evictions by
reload cost and priority, holds of models in flight, one load per GPU."""

from __future__ import annotations

from vramancer.gateway.scheduler import (
    GatewayPlan,
    GpuSlot,
    Load,
    ModelSlot,
    Pending,
    Unfit,
    load_order,
    plan,
)

GIB = 2**30
GPU = "gpu:0"


def slot(name: str, **kw: object) -> ModelSlot:
    base: dict[str, object] = {"name": name, "target": GPU, "vram_bytes": 8 * GIB}
    base.update(kw)
    return ModelSlot(**base)  # type: ignore[arg-type]


def gpus(free: int, loading: bool = False) -> dict[str, GpuSlot]:
    return {GPU: GpuSlot(GPU, free, loading)}


def run(
    pending: list[Pending], models: list[ModelSlot], free: int, now: float, **kw: object
) -> GatewayPlan:
    return plan(pending, {m.name: m for m in models}, gpus(free, **kw), now, max_wait_s=10.0)  # type: ignore[arg-type]


def test_requests_for_a_resident_model_go_at_once_up_to_its_concurrency() -> None:
    a = slot("a", resident=True, in_flight=1, max_concurrent=3)
    pending = [Pending(i, "a", float(i)) for i in (4, 1, 3, 2)]
    assert run(pending, [a], 4 * GIB, now=5).admit == (1, 2)


def test_a_model_that_fits_loads_without_evicting() -> None:
    a = slot("a", resident=True)
    b = slot("b", vram_bytes=4 * GIB)
    assert run([Pending(1, "b", 0)], [a, b], 4 * GIB, now=0).loads == (Load("b", GPU),)


def test_the_resident_group_is_served_before_a_swap() -> None:
    """a has requests in flight and waiting; b waits (not overdue): no swap yet."""
    a = slot("a", resident=True, in_flight=2, max_concurrent=2)
    b = slot("b")
    pending = [Pending(1, "b", 0.0), Pending(2, "a", 1.0)]
    decided = run(pending, [a, b], 0, now=5.0)
    assert decided.loads == () and decided.draining == () and decided.admit == ()


def test_an_idle_resident_model_is_evicted_for_a_waiting_one() -> None:
    a = slot("a", resident=True)
    b = slot("b")
    decided = run([Pending(1, "b", 0.0)], [a, b], 0, now=0.0)
    assert decided.loads == (Load("b", GPU, ("a",)),)


def test_an_overdue_request_drains_the_resident_model_then_evicts_it() -> None:
    a = slot("a", resident=True, in_flight=1, max_concurrent=4)
    b = slot("b")
    pending = [Pending(1, "b", 0.0), Pending(2, "a", 9.0)]
    decided = run(pending, [a, b], 0, now=10.0)
    # a stops taking requests (request 2 waits) and is not evicted while one is in flight
    assert decided == GatewayPlan(admit=(), loads=(), draining=("a",))
    done = slot("a", resident=True, in_flight=0)
    decided = run(pending, [done, b], 0, now=10.5)
    # a has a request waiting but b is overdue: a goes
    assert decided.loads == (Load("b", GPU, ("a",)),)


def test_a_model_in_flight_is_never_evicted_even_for_an_overdue_request() -> None:
    a = slot("a", resident=True, in_flight=3)
    b = slot("b")
    decided = run([Pending(1, "b", 0.0)], [a, b], 0, now=100.0)
    assert decided.loads == () and decided.draining == ("a",)


def test_the_victim_is_the_cheapest_to_reload_and_lowest_priority() -> None:
    cheap = slot("cheap", resident=True, vram_bytes=4 * GIB, reload_cost_s=1.0)
    dear = slot("dear", resident=True, vram_bytes=4 * GIB, reload_cost_s=50.0)
    vip = slot("vip", resident=True, vram_bytes=4 * GIB, reload_cost_s=1.0, priority_rank=3)
    b = slot("b", vram_bytes=4 * GIB)
    decided = run([Pending(1, "b", 0.0)], [vip, dear, cheap, b], 0, now=0.0)
    assert decided.loads == (Load("b", GPU, ("cheap",)),)
    decided = run([Pending(1, "b", 0.0)], [vip, dear, b], 0, now=0.0)
    assert decided.loads == (Load("b", GPU, ("dear",)),)  # vip outranks b: never its victim


def test_one_load_per_gpu_at_a_time() -> None:
    b, c = slot("b", vram_bytes=GIB), slot("c", vram_bytes=GIB)
    pending = [Pending(1, "b", 0.0), Pending(2, "c", 0.5)]
    assert run(pending, [b, c], 16 * GIB, now=1.0).loads == (Load("b", GPU),)
    assert run(pending, [b, c], 16 * GIB, now=1.0, loading=True).loads == ()


def test_cpu_loads_do_not_wait_for_the_gpu() -> None:
    b = slot("b")
    e = slot("e", target="cpu", vram_bytes=GIB)
    pending = [Pending(1, "b", 0.0), Pending(2, "e", 0.5)]
    decided = run(pending, [b, e], 16 * GIB, now=1.0, loading=True)
    assert decided.loads == (Load("e", "cpu"),)


def test_load_order_most_requests_first_then_overdue_first() -> None:
    groups = {
        "few": [Pending(1, "few", 0.0)],
        "many": [Pending(2, "many", 1.0), Pending(3, "many", 2.0)],
        "tie": [Pending(4, "tie", 0.5), Pending(5, "tie", 3.0)],
    }
    assert load_order(groups, now=5.0, max_wait_s=10.0) == ["tie", "many", "few"]
    assert load_order(groups, now=10.0, max_wait_s=10.0) == ["few", "tie", "many"]
    assert load_order(groups, now=11.0, max_wait_s=10.0) == ["few", "tie", "many"]


def test_a_model_bigger_than_its_gpu_is_unfit_naming_what_could_go() -> None:
    a = slot("a", resident=True, vram_bytes=4 * GIB)
    keep = slot("keep", resident=True, vram_bytes=2 * GIB, never_evict=True)
    huge = slot("huge", vram_bytes=40 * GIB)
    decided = run([Pending(1, "huge", 0.0)], [a, keep, huge], 2 * GIB, now=0.0)
    assert decided.unfit == (Unfit("huge", GPU, 40 * GIB, 2 * GIB, ("a",)),)
    assert decided.loads == ()


def test_no_starvation_alternating_requests_with_an_injected_clock() -> None:
    """Simulate: a is hammered with requests, b waits once. b is loaded within max_wait_s
    plus the time a's requests in flight take."""
    now = 0.0
    in_flight: list[float] = []  # end times of a's requests in flight
    resident = "a"
    pending = [Pending(0, "b", 0.0)]
    ids = iter(range(1, 10_000))
    swapped_at = None
    while now < 30.0 and swapped_at is None:
        in_flight = [t for t in in_flight if t > now]
        pending.append(Pending(next(ids), "a", now))
        models = [
            slot("a", resident=resident == "a", in_flight=len(in_flight), max_concurrent=4),
            slot("b", resident=resident == "b"),
        ]
        decided = run(pending, models, 0, now=now)
        in_flight += [now + 1.5] * len(decided.admit)
        pending = [p for p in pending if p.id not in decided.admit]
        if decided.loads:
            assert decided.loads == (Load("b", GPU, ("a",)),)
            swapped_at = now
        now += 0.25
    assert swapped_at is not None and 10.0 <= swapped_at <= 10.0 + 1.5 + 0.25


def test_a_model_evicted_by_this_plan_admits_nothing() -> None:
    a = slot("a", resident=True)
    b = slot("b")
    decided = run([Pending(1, "b", 0.0), Pending(2, "a", 10.0)], [a, b], 0, now=10.0)
    assert decided == GatewayPlan(admit=(), loads=(Load("b", GPU, ("a",)),))


def test_a_model_just_loaded_serves_its_older_requests_before_an_overdue_one_evicts_it() -> None:
    """Both waiting groups are overdue: the resident model's requests that are older than
    the other's oldest go first, its newer ones wait; no swap back and forth."""
    a = slot("a", resident=True, max_concurrent=2)
    b = slot("b")
    pending = [
        Pending(1, "a", 0.0),
        Pending(2, "b", 1.0),
        Pending(3, "a", 2.0),
        Pending(4, "a", 0.5),
    ]
    decided = run(pending, [a, b], 0, now=20.0)
    assert decided == GatewayPlan(admit=(1, 4), loads=(), draining=("a",))
    served = slot("a", resident=True, in_flight=0, max_concurrent=2)
    decided = run([Pending(2, "b", 1.0), Pending(3, "a", 2.0)], [served, b], 0, now=21.0)
    assert decided == GatewayPlan(admit=(), loads=(Load("b", GPU, ("a",)),))

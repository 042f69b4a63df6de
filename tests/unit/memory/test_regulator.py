"""Host-memory regulator: the pure plan (marks, hysteresis, floors, profiles) and its executor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tests.promtext import metric_value
from tests.unit.memory.store_support import StoreKit
from tests.unit.memory.store_support import make_settings as store_make_settings
from vramancer.clock import ManualClock
from vramancer.config import Settings
from vramancer.devices.types import HostSnapshot, SystemSnapshot
from vramancer.event_types import MemoryBudgetChanged
from vramancer.events import EventBus
from vramancer.memory.regulator import (
    BudgetChange,
    BudgetProfile,
    HostMemoryRegulator,
    RegulatorAction,
    RegulatorSettings,
    RegulatorState,
    plan_budgets,
    resolve_mark,
)
from vramancer.memory.settings import MemorySettings
from vramancer.observability.metrics import Metrics
from vramancer.runtime import Runtime

GIB = 1024**3
MIB = 1024**2
KIB = 1024
NOON = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def host(available: int, total: int = 16 * GIB) -> HostSnapshot:
    return HostSnapshot(
        cpu_count=2,
        cpu_utilization_ratio=0.0,
        memory_total_bytes=total,
        memory_available_bytes=available,
        memory_used_bytes=total - available,
        swap_total_bytes=0,
        swap_used_bytes=0,
    )


def make_settings(**overrides: object) -> RegulatorSettings:
    values: dict[str, object] = {
        "low_mark": "2GiB",
        "high_mark": "4GiB",
        "step": "512MiB",
        "floor": "1GiB",
        "cooldown_s": 60,
        "timezone": "UTC",
    }
    values.update(overrides)
    return RegulatorSettings.model_validate(values)


def initial(l4: int = 8 * GIB, l3: int = 2 * GIB) -> RegulatorState:
    return RegulatorState.initial({"L4": l4, "L3": l3})


# --------------------------------------------------------------------------- marks


def test_between_the_marks_nothing_changes() -> None:
    state = initial()
    plan = plan_budgets(host(3 * GIB), state, make_settings(), NOON)
    assert plan.action is RegulatorAction.HOLD
    assert plan.changes == ()
    assert plan.state == state
    assert (plan.low_bytes, plan.high_bytes) == (2 * GIB, 4 * GIB)


def test_under_the_low_mark_l4_shrinks_enough_to_reach_the_high_mark() -> None:
    plan = plan_budgets(host(1536 * MIB), initial(), make_settings(), NOON)
    assert plan.action is RegulatorAction.SHRINK
    # wanted = max(step 512 MiB, high 4 GiB - available 1.5 GiB) = 2.5 GiB, all from L4
    assert plan.changes == (BudgetChange("L4", 8 * GIB, 5632 * MIB),)
    assert plan.state.budgets == {"L4": 5632 * MIB, "L3": 2 * GIB}
    assert plan.state.pressured is True
    assert plan.state.last_shrink_at == NOON.timestamp()


def test_a_small_shortage_still_shrinks_one_step() -> None:
    settings = make_settings(high_mark="2100MiB", step="1GiB")
    plan = plan_budgets(host(2047 * MIB), initial(), settings, NOON)
    assert plan.changes == (BudgetChange("L4", 8 * GIB, 7 * GIB),)


def test_shrink_goes_l4_first_then_l3_and_stops_at_the_floors() -> None:
    settings = make_settings()
    plan = plan_budgets(host(0), initial(l4=3 * GIB, l3=2 * GIB), settings, NOON)
    # wanted 4 GiB; L4 gives 2 GiB (down to its 1 GiB floor), L3 gives 1 GiB
    assert plan.changes == (
        BudgetChange("L4", 3 * GIB, 1 * GIB),
        BudgetChange("L3", 2 * GIB, 1 * GIB),
    )
    again = plan_budgets(host(0), plan.state, settings, NOON + timedelta(seconds=5))
    assert again.action is RegulatorAction.HOLD
    assert again.changes == ()
    assert "all tiers at floor" in again.reason
    assert again.state.last_shrink_at == NOON.timestamp()  # nothing shrank this time


def test_floor_as_a_share_of_each_tiers_configured_capacity() -> None:
    settings = make_settings(floor=0.5, high_mark="16GiB")
    plan = plan_budgets(host(0), initial(l4=8 * GIB, l3=2 * GIB), settings, NOON)
    assert plan.state.budgets == {"L4": 4 * GIB, "L3": 1 * GIB}


def test_marks_as_shares_of_total_ram() -> None:
    settings = make_settings(low_mark=0.1, high_mark="20%")
    plan = plan_budgets(host(2 * GIB, total=10 * GIB), initial(), settings, NOON)
    assert (plan.low_bytes, plan.high_bytes) == (GIB, 2 * GIB)
    assert plan.action is RegulatorAction.HOLD  # exactly at the high mark: inside the band


def test_step_as_a_share_of_the_regulated_total() -> None:
    settings = make_settings(step=0.1)  # 10 % of 8 + 2 GiB = 1 GiB
    plan = plan_budgets(host(5 * GIB), initial(l4=6 * GIB), settings, NOON)
    assert plan.changes == ()  # at the ceiling already
    shrunk = RegulatorState(
        configured={"L4": 8 * GIB, "L3": 2 * GIB}, budgets={"L4": 4 * GIB, "L3": 2 * GIB}
    )
    plan = plan_budgets(host(10 * GIB), shrunk, settings, NOON)
    assert plan.changes == (BudgetChange("L4", 4 * GIB, 4 * GIB + 1024 * MIB),)


# --------------------------------------------------------------------------- hysteresis


def test_hysteresis_cooldown_and_gradual_give_back() -> None:
    settings = make_settings()
    state = plan_budgets(host(1536 * MIB), initial(), settings, NOON).state
    assert state.budgets["L4"] == 5632 * MIB

    # back inside the band: hold, still flagged as pressured
    plan = plan_budgets(host(3 * GIB), state, settings, NOON + timedelta(seconds=10))
    assert (plan.action, plan.changes, plan.state.pressured) == (RegulatorAction.HOLD, (), True)

    # over the high mark but within the cooldown: hold
    plan = plan_budgets(host(6 * GIB), plan.state, settings, NOON + timedelta(seconds=30))
    assert plan.action is RegulatorAction.HOLD and "cooling down" in plan.reason
    assert plan.state.pressured is False

    # after the cooldown: one step (512 MiB) at a time back to the configured 8 GiB
    budgets = []
    when = NOON + timedelta(seconds=61)
    state = plan.state
    for _ in range(7):
        plan = plan_budgets(host(6 * GIB), state, settings, when)
        budgets.append((plan.action, state.budgets["L4"] // MIB, plan.state.budgets["L4"] // MIB))
        state = plan.state
        when += timedelta(seconds=5)
    grow, hold = RegulatorAction.GROW, RegulatorAction.HOLD
    assert budgets == [
        (grow, 5632, 6144),
        (grow, 6144, 6656),
        (grow, 6656, 7168),
        (grow, 7168, 7680),
        (grow, 7680, 8192),
        (hold, 8192, 8192),
        (hold, 8192, 8192),
    ]
    assert "at their ceiling" in plan.reason


def test_give_back_never_exceeds_the_surplus_over_the_high_mark() -> None:
    shrunk = RegulatorState(
        configured={"L4": 8 * GIB, "L3": 2 * GIB}, budgets={"L4": 2 * GIB, "L3": 2 * GIB}
    )
    plan = plan_budgets(host(4 * GIB + 100 * MIB), shrunk, make_settings(), NOON)
    assert plan.changes == (BudgetChange("L4", 2 * GIB, 2 * GIB + 100 * MIB),)


def test_give_back_goes_to_l3_first() -> None:
    shrunk = RegulatorState(
        configured={"L4": 8 * GIB, "L3": 2 * GIB}, budgets={"L4": 1 * GIB, "L3": 1792 * MIB}
    )
    plan = plan_budgets(host(8 * GIB), shrunk, make_settings(), NOON)
    assert plan.changes == (
        BudgetChange("L4", 1 * GIB, 1280 * MIB),
        BudgetChange("L3", 1792 * MIB, 2 * GIB),
    )


def test_only_configured_tiers_present_are_regulated() -> None:
    state = RegulatorState.initial({"L4": 8 * GIB})  # no L3 on this machine (no CUDA)
    plan = plan_budgets(host(0), state, make_settings(), NOON)
    assert [c.tier for c in plan.changes] == ["L4"]
    settings = make_settings(tiers=["l3"])
    assert plan_budgets(host(0), state, settings, NOON).changes == ()


# --------------------------------------------------------------------------- profiles


NIGHT = [{"start_hour": 22, "end_hour": 7, "l4_capacity": "2GiB"}]


@pytest.mark.parametrize(
    ("hour", "covered"), [(21, False), (22, True), (23, True), (0, True), (6, True), (7, False)]
)
def test_profile_hours_wrap_midnight(hour: int, covered: bool) -> None:
    assert BudgetProfile(start_hour=22, end_hour=7).covers(hour) is covered
    assert BudgetProfile(start_hour=8, end_hour=20).covers(hour) is (8 <= hour < 20)


def test_night_profile_caps_l4_and_day_gives_it_back() -> None:
    settings = make_settings(profiles=NIGHT, step="4GiB", cooldown_s=0)
    night = datetime(2026, 11, 27, 23, 0, tzinfo=UTC)
    plan = plan_budgets(host(3 * GIB), initial(), settings, night)
    assert plan.action is RegulatorAction.PROFILE
    assert plan.profile == 0
    assert plan.changes == (BudgetChange("L4", 8 * GIB, 2 * GIB),)
    # plenty of memory at night: still capped
    plan = plan_budgets(host(12 * GIB), plan.state, settings, night + timedelta(hours=1))
    assert (plan.action, plan.changes) == (RegulatorAction.HOLD, ())
    assert plan.ceilings == {"L4": 2 * GIB, "L3": 2 * GIB}
    # morning: the cap is gone, budget comes back as memory allows (surplus 8 GiB, step 4 GiB)
    morning = datetime(2026, 11, 28, 7, 0, tzinfo=UTC)
    plan = plan_budgets(host(12 * GIB), plan.state, settings, morning)
    assert plan.profile is None
    assert plan.changes == (BudgetChange("L4", 2 * GIB, 6 * GIB),)


def test_profile_cap_as_a_share_and_shrinking_under_it() -> None:
    settings = make_settings(
        profiles=[{"start_hour": 0, "end_hour": 24, "l4_capacity": 0.5, "l3_capacity": "1GiB"}]
    )
    plan = plan_budgets(host(1 * GIB), initial(), settings, NOON)
    # capped to 4 GiB / 1 GiB, then shrunk by max(512 MiB, 4 GiB - 1 GiB) = 3 GiB from L4
    assert plan.action is RegulatorAction.SHRINK
    assert plan.state.budgets == {"L4": 1 * GIB, "L3": 1 * GIB}
    assert plan.floors == {"L4": 1 * GIB, "L3": 1 * GIB}


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"low_mark": "5GiB", "high_mark": "4GiB"}, "low_mark must not be above high_mark"),
        ({"low_mark": 0.3, "high_mark": 0.2}, "low_mark must not be above high_mark"),
        ({"low_mark": "150%"}, "a share must be in"),
        ({"low_mark": "lots"}, "expected an integer number of bytes"),
        ({"tiers": ["L5"]}, "only host tiers"),
        ({"tiers": ["L4", "l4"]}, "listed twice"),
        ({"timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
        ({"profiles": [{"start_hour": 5, "end_hour": 5}]}, "must differ"),
        ({"profiles": [{"start_hour": 5, "end_hour": 6, "l5_capacity": 1}]}, "l5_capacity"),
        ({"interval_s": 0}, "interval_s"),
        ({"lowmark": "1GiB"}, "lowmark"),
    ],
)
def test_bad_settings_name_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(**overrides)


def test_settings_are_part_of_memory_settings() -> None:
    memory = MemorySettings.model_validate({"regulator": {"low_mark": "1GiB", "enabled": False}})
    assert memory.regulator.low_mark == GIB and memory.regulator.enabled is False
    assert MemorySettings().regulator == RegulatorSettings()
    with pytest.raises(ValidationError, match="nonsense"):
        MemorySettings.model_validate({"regulator": {"nonsense": 1}})


def test_resolve_mark() -> None:
    assert resolve_mark(0.25, 1000) == 250
    assert resolve_mark(1.0, 1000) == 1000
    assert resolve_mark(300, 1000) == 300
    assert make_settings(low_mark=1.0, high_mark=1.0).low_mark == 1.0


# --------------------------------------------------------------------------- executor


class StoreDouble:
    """The two store methods the regulator uses; a missing tier raises KeyError."""

    def __init__(self, capacities: dict[str, int]) -> None:
        self.capacities = dict(capacities)
        self.calls: list[tuple[str, int]] = []

    def capacity(self, tier: str) -> int | None:
        return self.capacities[tier]

    def set_capacity(self, tier: str, capacity_bytes: int) -> None:
        self.calls.append((tier, capacity_bytes))
        self.capacities[tier] = capacity_bytes


class HostDouble:
    def __init__(self, available: int) -> None:
        self.available = available

    def snapshot(self) -> SystemSnapshot:
        return SystemSnapshot(host=host(self.available))


def make_regulator(
    store: StoreDouble, devices: HostDouble, clock: ManualClock, **overrides: object
) -> tuple[HostMemoryRegulator, EventBus, Metrics]:
    events, metrics = EventBus(), Metrics(node="test")
    regulator = HostMemoryRegulator(
        make_settings(**overrides),
        store=store,
        devices=devices,
        events=events,
        clock=clock,
        metrics=metrics,
    )
    return regulator, events, metrics


def noon_clock() -> ManualClock:
    return ManualClock(start=0.0, wall_offset=NOON.timestamp())


def test_tick_applies_the_plan_and_publishes_events() -> None:
    store = StoreDouble({"L4": 8 * GIB})  # no L3: capacity() raises KeyError
    devices = HostDouble(1536 * MIB)
    clock = noon_clock()
    regulator, events, metrics = make_regulator(store, devices, clock)
    plan = regulator.tick()
    assert plan is not None and plan.action is RegulatorAction.SHRINK
    assert store.calls == [("L4", 5632 * MIB)]
    [event] = events.recent(kind=MemoryBudgetChanged)
    assert event.data == {
        "tier": "L4",
        "old_bytes": 8 * GIB,
        "new_bytes": 5632 * MIB,
        "action": "shrink",
        "reason": plan.reason,
        "available_bytes": 1536 * MIB,
        "low_bytes": 2 * GIB,
        "high_bytes": 4 * GIB,
    }
    text = metrics.render().decode()
    assert metric_value(text, "vramancer_memory_budget_bytes", tier="L4") == 5.905580032e09
    changes = "vramancer_memory_budget_changes_total"
    assert metric_value(text, changes, action="shrink", tier="L4") == 1

    devices.available = 6 * GIB
    clock.advance(61)
    regulator.tick()
    assert store.calls[-1] == ("L4", 6 * GIB)
    assert regulator.state is not None and regulator.state.configured == {"L4": 8 * GIB}


def test_tick_holds_without_calls_or_events() -> None:
    store = StoreDouble({"L4": 8 * GIB, "L3": 2 * GIB})
    regulator, events, _ = make_regulator(store, HostDouble(3 * GIB), noon_clock())
    plan = regulator.tick()
    assert plan is not None and plan.action is RegulatorAction.HOLD
    assert store.calls == [] and events.recent(kind=MemoryBudgetChanged) == []


def test_disabled_or_without_host_tiers_does_nothing() -> None:
    store = StoreDouble({"L4": 8 * GIB})
    off, _, _ = make_regulator(store, HostDouble(0), noon_clock(), enabled=False)
    assert off.tick() is None
    none, _, _ = make_regulator(StoreDouble({}), HostDouble(0), noon_clock())
    assert none.tick() is None
    assert store.calls == []


def test_night_profile_follows_the_injected_clock() -> None:
    store = StoreDouble({"L4": 8 * GIB, "L3": 2 * GIB})
    clock = noon_clock()
    regulator, events, _ = make_regulator(store, HostDouble(3 * GIB), clock, profiles=NIGHT)
    assert regulator.tick() is not None and store.calls == []
    clock.advance(11 * 3600)  # 23:00 UTC
    plan = regulator.tick()
    assert plan is not None and plan.action is RegulatorAction.PROFILE
    assert store.calls == [("L4", 2 * GIB)]
    assert [e.data["action"] for e in events.recent(kind=MemoryBudgetChanged)] == ["profile"]


def test_timezone_decides_the_hour() -> None:
    store = StoreDouble({"L4": 8 * GIB})
    clock = ManualClock(
        start=0.0, wall_offset=datetime(2026, 11, 27, 21, 30, tzinfo=UTC).timestamp()
    )
    paris, _, _ = make_regulator(
        store, HostDouble(3 * GIB), clock, profiles=NIGHT, timezone="Europe/Paris"
    )
    plan = paris.tick()  # 22:30 in Paris (UTC+1 in November)
    assert plan is not None and plan.profile == 0


async def test_start_polls_on_its_interval_and_stop_ends_the_loop() -> None:
    store = StoreDouble({"L4": 8 * GIB})
    devices = HostDouble(1536 * MIB)
    regulator, _, _ = make_regulator(store, devices, noon_clock(), interval_s=0.01)
    await regulator.start()
    for _ in range(200):
        if store.calls:
            break
        await asyncio.sleep(0.01)
    await regulator.stop()
    assert store.calls[0] == ("L4", 5632 * MIB)
    calls = len(store.calls)
    await asyncio.sleep(0.05)
    assert len(store.calls) == calls  # stopped: no more ticks
    await regulator.stop()  # idempotent


async def test_a_failing_tick_does_not_stop_the_loop() -> None:
    class FlakyHost(HostDouble):
        def __init__(self) -> None:
            super().__init__(1536 * MIB)
            self.calls = 0

        def snapshot(self) -> SystemSnapshot:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("psutil hiccup")
            return super().snapshot()

    store = StoreDouble({"L4": 8 * GIB})
    devices = FlakyHost()
    regulator, _, _ = make_regulator(store, devices, noon_clock(), interval_s=0.01)
    await regulator.start()
    for _ in range(200):
        if store.calls:
            break
        await asyncio.sleep(0.01)
    await regulator.stop()
    assert devices.calls >= 2 and store.calls[0] == ("L4", 5632 * MIB)


# --------------------------------------------------------------------------- real store


def test_regulator_shrinks_and_restores_a_real_store_without_losing_blocks(
    tmp_path: Path,
) -> None:
    kit = StoreKit(tmp_path / "data", store_make_settings(l4=64 * KIB))
    store = kit.store
    values = {f"b{i}": np.random.default_rng(i).bytes(6 * KIB) for i in range(8)}
    for key, value in values.items():
        store.put(key, value)
    assert {store.locate(k) for k in values} == {"L4"}
    devices = HostDouble(1 * GIB)
    regulator = HostMemoryRegulator(
        make_settings(floor="16KiB", step="16KiB"),
        store=store,
        devices=devices,
        events=kit.events,
        clock=kit.clock,
    )
    plan = regulator.tick()
    assert plan is not None and plan.action is RegulatorAction.SHRINK
    assert plan.changes == (BudgetChange("L4", 64 * KIB, 16 * KIB),)  # L3 absent without CUDA
    assert store.capacity("L4") == 16 * KIB
    l4 = next(t for t in store.stats()["tiers"] if t["name"] == "L4")
    assert l4["used_bytes"] <= 16 * KIB
    assert sum(store.locate(k) != "L4" for k in values) >= 6  # demoted, not dropped
    for key, value in values.items():
        assert store.get(key) == value
    kit.check_invariants()
    assert [e.data["new_bytes"] for e in kit.events.recent(kind=MemoryBudgetChanged)] == [16 * KIB]

    devices.available = 8 * GIB  # memory is back: after the cooldown, one step per tick
    kit.clock.advance(61)
    regulator.tick()
    assert store.capacity("L4") == 32 * KIB
    for _ in range(5):
        regulator.tick()
    assert store.capacity("L4") == 64 * KIB
    kit.check_invariants()
    store.close()


async def test_runtime_builds_and_starts_the_regulator_after_the_store(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(memory={"regulator": {"interval_s": 3600}})
    runtime = Runtime(settings)
    components = runtime._components
    assert components.index(runtime.regulator) == components.index(runtime.memory) + 1
    async with runtime:
        assert runtime.regulator.running
        plan = await asyncio.to_thread(runtime.regulator.tick)
        assert plan is not None
        assert set(plan.state.configured) <= {"L3", "L4"}
        assert plan.state.configured["L4"] == runtime.memory.capacity("L4")
    assert not runtime.regulator.running

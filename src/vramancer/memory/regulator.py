"""Host-memory regulator: keeps the host's free memory between two marks by moving the L3/L4
budgets (a homeostasis loop with hysteresis).

The store's host tiers (L3 pinned, L4 pageable) take RAM that the rest of the machine may need.
The regulator watches the host's MemAvailable and moves their capacity budgets:

* under ``low_mark``: shrink the budgets (L4 first, then L3, never under ``floor``) by enough
  to bring MemAvailable back to ``high_mark``, at least one ``step``; the store demotes blocks
  down (to L5/L6) until each tier fits, so no data is lost;
* over ``high_mark`` (and ``cooldown_s`` after the last shrink): give budget back toward the
  configured capacity, one ``step`` at a time and never more than the surplus over the high
  mark, so that filling it cannot by itself push MemAvailable back under the mark;
* in between: hold (the hysteresis band: no flapping around one threshold);
* optional profiles cap the budgets by hour of day (e.g. a smaller L4 at night, when batch jobs
  run), with the hour from the injected clock.

:func:`plan_budgets` is the pure policy (host snapshot, state, settings, time in; a plan out);
:class:`HostMemoryRegulator` polls, applies plans through ``store.set_capacity`` and publishes
a ``memory_budget_changed`` event per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from vramancer import event_types as ev
from vramancer.errors import VramancerError
from vramancer.units import format_size as _h
from vramancer.units import parse_size

if TYPE_CHECKING:  # memory.settings imports this module: keep config free of the device layer
    from vramancer.clock import Clock
    from vramancer.devices.types import HostSnapshot, SystemSnapshot
    from vramancer.events import EventBus
    from vramancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

#: The tiers that live in host memory, the only ones the regulator may resize.
HOST_TIERS = ("L3", "L4")


def _parse_mark(value: Any) -> int | float:
    """A share of a whole (``0.1``, ``"10%"``) as a float in (0, 1], or bytes as an int."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"expected a percentage such as '10%', got {value!r}") from None
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value <= 1:
            raise ValueError(f"a share must be in (0, 1], got {value}")
        return value
    if isinstance(value, float) and value == 1.0:
        return 1.0
    return parse_size(value)


#: A size (``"4GiB"``, bytes) or a share of a whole (``0.1`` or ``"10%"``).
Mark = Annotated[int | float, BeforeValidator(_parse_mark)]


def resolve_mark(mark: int | float, whole: int) -> int:
    """``mark`` in bytes: a share (float) of ``whole``, or bytes as they are."""
    if isinstance(mark, float):
        return int(whole * mark)
    return mark


class BudgetProfile(BaseModel):
    """A cap on the host tiers' budgets from ``start_hour`` (inclusive) to ``end_hour``
    (exclusive), local time; ``start_hour > end_hour`` wraps midnight (22 → 7)."""

    model_config = ConfigDict(extra="forbid")

    start_hour: int = Field(ge=0, le=23)
    end_hour: int = Field(ge=0, le=24)
    #: Most L4 may hold while the profile is active (None: no cap).
    l4_capacity: Mark | None = None
    #: Most L3 may hold while the profile is active (None: no cap).
    l3_capacity: Mark | None = None

    @model_validator(mode="after")
    def _check(self) -> BudgetProfile:
        if self.start_hour == self.end_hour:
            raise ValueError("start_hour and end_hour must differ (use 0 and 24 for all day)")
        return self

    def covers(self, hour: int) -> bool:
        if self.start_hour < self.end_hour:
            return self.start_hour <= hour < self.end_hour
        return hour >= self.start_hour or hour < self.end_hour

    def cap(self, tier: str) -> int | float | None:
        return self.l4_capacity if tier == "L4" else self.l3_capacity


class RegulatorSettings(BaseModel):
    """``[memory.regulator]``: watermarks, step, floor, interval and day/night profiles."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Under this much MemAvailable the host tiers shrink (bytes, or a share of total RAM).
    low_mark: Mark = 0.10
    #: Over this much MemAvailable budget is given back (bytes, or a share of total RAM).
    high_mark: Mark = 0.20
    #: Smallest change per tick (bytes, or a share of the regulated tiers' configured total).
    step: Mark = 0.05
    #: A tier never shrinks under this (bytes, or a share of its configured capacity).
    floor: Mark = 0.25
    #: Seconds between two looks at the host's memory.
    interval_s: float = Field(default=5.0, gt=0)
    #: Seconds after a shrink during which no budget is given back.
    cooldown_s: float = Field(default=30.0, ge=0)
    #: Tiers regulated, in the order they shrink (budget comes back in the reverse order).
    tiers: list[str] = Field(default_factory=lambda: ["L4", "L3"], min_length=1)
    #: Time zone of the profiles' hours: an IANA name, ``UTC``; unset: the machine's local time.
    timezone: str | None = None
    #: Budget caps by hour of day; the first profile covering the hour applies.
    profiles: list[BudgetProfile] = Field(default_factory=list)

    @field_validator("tiers", mode="before")
    @classmethod
    def _upper_tiers(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v).upper() for v in value]
        return value

    @field_validator("tiers")
    @classmethod
    def _host_tiers(cls, value: list[str]) -> list[str]:
        for tier in value:
            if tier not in HOST_TIERS:
                raise ValueError(f"{tier}: only host tiers (L3, L4) can be regulated")
        if len(set(value)) != len(value):
            raise ValueError("a tier is listed twice")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            zone_for(value)
        return value

    @model_validator(mode="after")
    def _marks_in_order(self) -> RegulatorSettings:
        same_kind = isinstance(self.low_mark, float) == isinstance(self.high_mark, float)
        if same_kind and self.low_mark > self.high_mark:
            raise ValueError("low_mark must not be above high_mark")
        return self


def zone_for(name: str | None) -> tzinfo | None:
    """The tzinfo of ``name`` (``None``: local time)."""
    if name is None:
        return None
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name or UTC)") from None


class RegulatorAction(StrEnum):
    """What one plan does."""

    #: Nothing to change (MemAvailable in the band, or nothing left to give or take).
    HOLD = "hold"
    #: MemAvailable under the low mark: budgets shrink.
    SHRINK = "shrink"
    #: MemAvailable over the high mark: budget given back.
    GROW = "grow"
    #: An hour profile caps a budget that was above it.
    PROFILE = "profile"


@dataclass(frozen=True, slots=True)
class RegulatorState:
    """What the policy remembers between ticks."""

    #: Capacity of each regulated tier as the store had it at start: the most given back.
    configured: Mapping[str, int]
    #: Budget the regulator last set for each tier.
    budgets: Mapping[str, int]
    #: In the hysteresis band after going under the low mark (until over the high mark).
    pressured: bool = False
    #: Wall-clock time (seconds) of the last shrink; growth waits ``cooldown_s`` after it.
    last_shrink_at: float | None = None

    @classmethod
    def initial(cls, capacities: Mapping[str, int]) -> RegulatorState:
        return cls(configured=dict(capacities), budgets=dict(capacities))


@dataclass(frozen=True, slots=True)
class BudgetChange:
    tier: str
    old_bytes: int
    new_bytes: int


@dataclass(frozen=True, slots=True)
class RegulatorPlan:
    """The outcome of one look at the host: the changes to apply and the next state."""

    action: RegulatorAction
    changes: tuple[BudgetChange, ...]
    state: RegulatorState
    reason: str
    available_bytes: int
    low_bytes: int
    high_bytes: int
    #: Index of the profile in force, if any.
    profile: int | None = None
    ceilings: Mapping[str, int] = field(default_factory=dict)
    floors: Mapping[str, int] = field(default_factory=dict)


def active_profile(profiles: Sequence[BudgetProfile], hour: int) -> int | None:
    for index, profile in enumerate(profiles):
        if profile.covers(hour):
            return index
    return None


def plan_budgets(
    host: HostSnapshot, state: RegulatorState, settings: RegulatorSettings, now: datetime
) -> RegulatorPlan:
    """Pure policy: the budgets of the regulated tiers after looking at ``host`` at ``now``."""
    total = host.memory_total_bytes
    available = host.memory_available_bytes
    low = resolve_mark(settings.low_mark, total)
    high = max(low, resolve_mark(settings.high_mark, total))
    tiers = [t for t in settings.tiers if t in state.configured]
    profile = active_profile(settings.profiles, now.hour)
    ceilings = {t: _ceiling(t, state.configured[t], settings, profile) for t in tiers}
    floors = {t: min(ceilings[t], resolve_mark(settings.floor, state.configured[t])) for t in tiers}
    step = resolve_mark(settings.step, sum(state.configured[t] for t in tiers))
    budgets = {t: min(state.budgets.get(t, state.configured[t]), ceilings[t]) for t in tiers}
    capped = budgets != {t: state.budgets.get(t, state.configured[t]) for t in tiers}
    stamp = now.timestamp()
    pressured = state.pressured
    last_shrink = state.last_shrink_at

    if available < low:
        pressured = True
        wanted = max(step, high - available)
        taken = _take(budgets, floors, tiers, wanted)
        if taken:
            last_shrink = stamp
            action = RegulatorAction.SHRINK
            reason = (
                f"MemAvailable {_h(available)} under the low mark {_h(low)}: shrank by {_h(taken)}"
            )
        else:
            action = RegulatorAction.PROFILE if capped else RegulatorAction.HOLD
            reason = (
                f"MemAvailable {_h(available)} under the low mark {_h(low)}: all tiers at floor"
            )
    elif available > high:
        pressured = False
        cooling = last_shrink is not None and stamp - last_shrink < settings.cooldown_s
        given = 0 if cooling else _give(budgets, ceilings, tiers, min(step, available - high))
        if given:
            action = RegulatorAction.GROW
            reason = (
                f"MemAvailable {_h(available)} over the high mark {_h(high)}: gave back {_h(given)}"
            )
        else:
            action = RegulatorAction.PROFILE if capped else RegulatorAction.HOLD
            reason = "cooling down after a shrink" if cooling else "budgets at their ceiling"
    else:
        action = RegulatorAction.PROFILE if capped else RegulatorAction.HOLD
        reason = f"MemAvailable {_h(available)} between the marks {_h(low)} and {_h(high)}"
    if action is RegulatorAction.PROFILE:
        reason = f"profile {profile} caps the budgets ({reason})"

    changes = tuple(
        BudgetChange(t, state.budgets.get(t, state.configured[t]), budgets[t])
        for t in tiers
        if budgets[t] != state.budgets.get(t, state.configured[t])
    )
    next_state = replace(
        state,
        budgets={**state.budgets, **budgets},
        pressured=pressured,
        last_shrink_at=last_shrink,
    )
    return RegulatorPlan(
        action, changes, next_state, reason, available, low, high, profile, ceilings, floors
    )


def _ceiling(tier: str, configured: int, settings: RegulatorSettings, profile: int | None) -> int:
    if profile is None:
        return configured
    cap = settings.profiles[profile].cap(tier)
    return configured if cap is None else min(configured, resolve_mark(cap, configured))


def _take(
    budgets: dict[str, int], floors: Mapping[str, int], order: Sequence[str], wanted: int
) -> int:
    """Take up to ``wanted`` bytes from ``budgets`` in ``order``, down to the floors."""
    taken = 0
    for tier in order:
        room = max(0, budgets[tier] - floors[tier])
        cut = min(room, wanted - taken)
        budgets[tier] -= cut
        taken += cut
    return taken


def _give(
    budgets: dict[str, int], ceilings: Mapping[str, int], order: Sequence[str], offered: int
) -> int:
    """Give up to ``offered`` bytes back, in reverse ``order``, up to the ceilings."""
    given = 0
    for tier in reversed(order):
        room = max(0, ceilings[tier] - budgets[tier])
        grant = min(room, offered - given)
        budgets[tier] += grant
        given += grant
    return given


# --------------------------------------------------------------------------- executor


class CapacityControl(Protocol):
    """What the regulator needs from the store."""

    def capacity(self, tier: str) -> int | None: ...

    def set_capacity(self, tier: str, capacity_bytes: int) -> None: ...


class HostSource(Protocol):
    def snapshot(self) -> SystemSnapshot: ...


class HostMemoryRegulator:
    """Applies :func:`plan_budgets` every ``interval_s`` (``tick()`` runs it once)."""

    def __init__(
        self,
        settings: RegulatorSettings,
        *,
        store: CapacityControl,
        devices: HostSource,
        events: EventBus,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.devices = devices
        self.events = events
        self.clock = clock
        self._zone = zone_for(settings.timezone)
        self._state: RegulatorState | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_plan: RegulatorPlan | None = None
        self._changes = (
            metrics.counter(
                "vramancer_memory_budget_changes_total",
                "Host-tier budget changes made by the host-memory regulator",
                ["tier", "action"],
            )
            if metrics is not None
            else None
        )
        self._budget = (
            metrics.gauge(
                "vramancer_memory_budget_bytes",
                "Capacity budget the host-memory regulator gives each host tier",
                ["tier"],
            )
            if metrics is not None
            else None
        )

    @property
    def state(self) -> RegulatorState | None:
        return self._state

    @property
    def running(self) -> bool:
        """Whether the polling loop is on (between ``start`` and ``stop``, when enabled)."""
        return self._task is not None

    async def start(self) -> None:
        if self.settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="memory-regulator")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def tick(self) -> RegulatorPlan | None:
        """Look at the host once and apply the plan; ``None`` if disabled or nothing to
        regulate (no host tier present)."""
        if not self.settings.enabled:
            return None
        state = self._state if self._state is not None else self._initial_state()
        if state is None:
            return None
        host = self.devices.snapshot().host
        now = datetime.fromtimestamp(self.clock.time(), self._zone)
        plan = plan_budgets(host, state, self.settings, now)
        for change in plan.changes:
            self.store.set_capacity(change.tier, change.new_bytes)
            self.events.publish(
                ev.MemoryBudgetChanged(
                    tier=change.tier,
                    old_bytes=change.old_bytes,
                    new_bytes=change.new_bytes,
                    action=plan.action.value,
                    reason=plan.reason,
                    available_bytes=plan.available_bytes,
                    low_bytes=plan.low_bytes,
                    high_bytes=plan.high_bytes,
                )
            )
            if self._changes is not None:
                self._changes.labels(tier=change.tier, action=plan.action.value).inc()
        if self._budget is not None:
            for tier, budget in plan.state.budgets.items():
                self._budget.labels(tier=tier).set(budget)
        self._state = plan.state
        self.last_plan = plan
        return plan

    def _initial_state(self) -> RegulatorState | None:
        capacities: dict[str, int] = {}
        for tier in self.settings.tiers:
            try:
                capacity = self.store.capacity(tier)
            except (LookupError, VramancerError):
                continue  # the machine lacks this tier
            if capacity:
                capacities[tier] = capacity
        return RegulatorState.initial(capacities) if capacities else None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("host-memory regulator tick failed")
            await asyncio.sleep(self.settings.interval_s)


__all__ = [
    "HOST_TIERS",
    "BudgetChange",
    "BudgetProfile",
    "CapacityControl",
    "HostMemoryRegulator",
    "HostSource",
    "Mark",
    "RegulatorAction",
    "RegulatorPlan",
    "RegulatorSettings",
    "RegulatorState",
    "plan_budgets",
    "resolve_mark",
    "zone_for",
]

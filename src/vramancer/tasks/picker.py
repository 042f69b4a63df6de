"""The device picker: a pure function of device views (telemetry + reservations) and a need.

A device is *eligible* for a task when its telemetry is fresh
(``heartbeat_ttl_s``, 15 s), it is not too hot (≤ 78 °C) or too busy (≤ 95 %), it has a free
slot, and the task's VRAM need fits in its *available* bytes::

    available = min(driver_free - unseen, grantable)

``grantable`` is what the arbiter can still grant on the device (its per-GPU budget minus what it
has granted: models and running tasks); ``unseen`` is the part of our running tasks'
reservations the driver does not show yet, so VRAM a just-started task reserved counts as used
before its process allocates it. Among eligible devices ``spread`` prefers an idle one, then the
lowest score (busy, temperature, stale telemetry, our load), then the most available VRAM;
``binpack`` prefers the tightest fit. No I/O here: "no room" is a value (``NoRoom``) with a
reason per device, and ``assume`` returns the views as they are once a placement is made, so one
dispatch round can place many tasks.

Aging: a task that has waited too long and fits nowhere gets a device *held* for it (``hold``):
the device it would fit once our own tasks there have ended (``drained``). No other task starts
on a held device, so it drains and the waiting task runs; a device that would not fit it even
drained (someone else's VRAM, too hot) is never held, so a hold cannot block a device for
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from vramancer.devices.ids import gpu_name
from vramancer.devices.types import SystemSnapshot
from vramancer.tasks.settings import PickerStrategy, TasksSettings
from vramancer.units import count_of, format_size

HOST = "host"
#: Assumed utilization and temperature when a device does not report them (mid-range: such
#: a device is neither preferred nor ruled out).
UNKNOWN_BUSY = 0.5
UNKNOWN_TEMPERATURE_CELSIUS = 60.0
#: Score weights (lower is better): per unit of busy, per °C, stale telemetry, our load.
W_BUSY = 100.0
W_TEMPERATURE = 0.5
W_STALE = 30.0
W_LOAD = 50.0


@dataclass(frozen=True, slots=True)
class DeviceView:
    """One device as the picker sees it at one instant."""

    device: str
    index: int | None
    total_bytes: int
    free_bytes: int
    #: What the arbiter can still grant on this device.
    grantable_bytes: int = 0
    unseen_bytes: int = 0
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    age_s: float = 0.0
    error: bool = False
    running: int = 0
    slots: int = 1
    #: The CUDA index a task on this device sees, or None (simulated, host).
    cuda_index: int | None = None
    #: VRAM our running tasks have reserved on it (seen by the driver or not).
    own_bytes: int = 0
    #: Held for this long-waiting task: no other task may start here.
    held_for: str | None = None
    #: The node of the pool this device belongs to (None: this machine, no pool).
    node: str | None = None
    #: Our tasks running on it (the ones taking its slots), for the reasons a task waits.
    task_ids: tuple[str, ...] = ()
    #: The arbiter's allocations on it (models, tasks, API allocations): count and bytes.
    reservations: int = 0
    reserved_bytes: int = 0
    #: Memory used on it outside VRAMancer (``devices.holders.external_bytes``).
    external_bytes: int = 0

    @property
    def available_bytes(self) -> int:
        return max(0, min(self.free_bytes - self.unseen_bytes, self.grantable_bytes))


@dataclass(frozen=True, slots=True)
class PickerPolicy:
    """The thresholds and strategy of the picker (from ``[tasks]``)."""

    strategy: PickerStrategy = PickerStrategy.SPREAD
    heartbeat_ttl_s: float = 15.0
    stale_after_s: float = 5.0
    max_temperature_celsius: float = 78.0
    max_busy_ratio: float = 0.95
    idle_busy_ratio: float = 0.05

    @classmethod
    def from_settings(cls, s: TasksSettings) -> PickerPolicy:
        return cls(
            strategy=s.picker,
            heartbeat_ttl_s=s.heartbeat_ttl_s,
            stale_after_s=s.stale_after_s,
            max_temperature_celsius=s.max_temperature_celsius,
            max_busy_ratio=s.max_busy_ratio,
            idle_busy_ratio=s.idle_busy_ratio,
        )


@dataclass(frozen=True, slots=True)
class Placement:
    """Run the task on ``device``."""

    device: str
    index: int | None
    score: float


@dataclass(frozen=True, slots=True)
class NoRoom:
    """No device can take the task now; ``reasons`` says why, per device considered."""

    reasons: tuple[tuple[str, str], ...]

    def message(self) -> str:
        if not self.reasons:
            return "no device"
        return "; ".join(f"{device}: {why}" for device, why in self.reasons)


Decision = Placement | NoRoom


def ineligibility(view: DeviceView, need_bytes: int, policy: PickerPolicy) -> str | None:
    """Why ``view`` cannot take a task needing ``need_bytes`` now (every reason that holds,
    ``; ``-separated), or None when it can. The one rule for the reason a task waits: the
    dispatcher records it and every view of a waiting task recomputes it from the state now."""
    if view.held_for is not None:  # nothing else starts there, whatever else holds
        return f"held for task {view.held_for}, which has waited longest"
    reasons = [_health(view, policy)]
    if view.running >= view.slots:
        reasons.append(_slots(view))
    if need_bytes > view.available_bytes:
        reasons.append(_memory(view, need_bytes))
    found = [r for r in reasons if r]
    return "; ".join(found) if found else None


def _health(view: DeviceView, policy: PickerPolicy) -> str | None:
    if view.age_s > policy.heartbeat_ttl_s:
        return f"no telemetry for {view.age_s:.0f} s (TTL {policy.heartbeat_ttl_s:.0f} s)"
    temp = view.temperature_celsius
    if temp is not None and temp > policy.max_temperature_celsius:
        return f"too hot ({temp:.0f} °C > {policy.max_temperature_celsius:.0f} °C)"
    busy = view.utilization_ratio
    if busy is not None and busy > policy.max_busy_ratio:
        return f"too busy ({busy:.0%} > {policy.max_busy_ratio:.0%})"
    return None


def _slots(view: DeviceView) -> str:
    if not view.task_ids:
        return f"all {view.slots} slots in use"
    plural = "s" if len(view.task_ids) > 1 else ""
    return f"slots_per_device={view.slots} taken by task{plural} {', '.join(view.task_ids)}"


def _memory(view: DeviceView, need_bytes: int) -> str:
    text = f"needs {format_size(need_bytes)}, {format_size(view.available_bytes)} available"
    n = view.reservations
    if n:
        text += f" after {count_of(n, 'reservation')} ({format_size(view.reserved_bytes)})"
    else:
        text += " after reservations"
    if view.external_bytes:
        text += f" and {format_size(view.external_bytes)} used outside VRAMancer"
    return text


def score(view: DeviceView, policy: PickerPolicy) -> float:
    """Lower is better: busy, temperature, stale telemetry and our own load on the device."""
    busy = view.utilization_ratio if view.utilization_ratio is not None else UNKNOWN_BUSY
    temp = view.temperature_celsius
    if temp is None:
        temp = UNKNOWN_TEMPERATURE_CELSIUS
    stale = view.error or view.age_s > policy.stale_after_s
    return (
        W_BUSY * busy
        + W_TEMPERATURE * temp
        + (W_STALE if stale else 0.0)
        + W_LOAD * view.running / view.slots
    )


def is_idle(view: DeviceView, policy: PickerPolicy) -> bool:
    """Idle: none of our tasks on it, and fresh telemetry at or under the idle utilization."""
    busy = view.utilization_ratio
    return (
        view.running == 0
        and busy is not None
        and busy <= policy.idle_busy_ratio
        and not view.error
        and view.age_s <= policy.stale_after_s
    )


def _fits(view: DeviceView, need_bytes: int, policy: PickerPolicy) -> bool:
    """``ineligibility(...) is None``, without building the reason (the hot path)."""
    temp = view.temperature_celsius
    busy = view.utilization_ratio
    return (
        view.held_for is None
        and view.age_s <= policy.heartbeat_ttl_s
        and (temp is None or temp <= policy.max_temperature_celsius)
        and (busy is None or busy <= policy.max_busy_ratio)
        and view.running < view.slots
        and need_bytes <= view.available_bytes
    )


def _pinned_out(view: DeviceView, pin: int | None, node: str | None) -> bool:
    return (pin is not None and view.index != pin) or (node is not None and view.node != node)


def pick(
    views: Sequence[DeviceView],
    need_bytes: int,
    pin: int | None,
    policy: PickerPolicy,
    node: str | None = None,
) -> Decision:
    """Choose a device for a task needing ``need_bytes`` of VRAM, pinned to GPU ``pin`` (of
    node ``node`` in a pool) or not."""
    best: DeviceView | None = None
    best_key: tuple[float, float, float, int] | None = None
    binpack = policy.strategy is PickerStrategy.BINPACK
    for order, view in enumerate(views):
        if _pinned_out(view, pin, node):
            continue
        if not _fits(view, need_bytes, policy):
            continue
        s = score(view, policy)
        available = view.available_bytes
        if binpack:
            key = (float(available - need_bytes), s, 0.0, order)
        else:
            key = (0.0 if is_idle(view, policy) else 1.0, s, -float(available), order)
        if best_key is None or key < best_key:
            best, best_key = view, key
    if best is not None and best_key is not None:
        return Placement(best.device, best.index, best_key[1])
    reasons = [
        (view.device, ineligibility(view, need_bytes, policy) or "eligible")
        for view in views
        if not _pinned_out(view, pin, node)
    ]
    if node is not None and not reasons:
        reasons.append((node, "no live GPU on this node" if pin is None else "no such GPU"))
    elif pin is not None and not reasons:
        reasons.append((gpu_name(pin), "no such GPU"))
    return NoRoom(tuple(reasons))


def assume(
    views: Sequence[DeviceView], placement: Placement, need_bytes: int, task_id: str | None = None
) -> list[DeviceView]:
    """The views once the placed task (``task_id``) holds its slot and its VRAM (reserved,
    not yet seen)."""
    out = list(views)
    for i, view in enumerate(out):
        if view.device == placement.device:
            out[i] = replace(
                view,
                running=view.running + 1,
                unseen_bytes=view.unseen_bytes + need_bytes,
                grantable_bytes=view.grantable_bytes - need_bytes,
                own_bytes=view.own_bytes + need_bytes,
                task_ids=(*view.task_ids, task_id) if task_id else view.task_ids,
                reservations=view.reservations + (1 if need_bytes else 0),
                reserved_bytes=view.reserved_bytes + need_bytes,
            )
            break
    return out


def drained(view: DeviceView) -> DeviceView:
    """The view once our own running tasks on it have ended: their slots and VRAM come back
    (the part the driver shows returns to ``free``, all of it to ``grantable``)."""
    visible = max(0, view.own_bytes - view.unseen_bytes)
    return replace(
        view,
        running=0,
        unseen_bytes=0,
        own_bytes=0,
        free_bytes=min(view.total_bytes, view.free_bytes + visible),
        grantable_bytes=view.grantable_bytes + view.own_bytes,
        task_ids=(),
    )


def hold(
    views: Sequence[DeviceView],
    need_bytes: int,
    pin: int | None,
    task_id: str,
    policy: PickerPolicy,
    node: str | None = None,
) -> tuple[list[DeviceView], str | None]:
    """Hold for ``task_id`` (which fits nowhere now) the device it would get once our own tasks
    there have ended; returns the views and the held device (None: draining would not help)."""
    free = [v for v in views if v.held_for is None]
    target = pick([drained(v) for v in free], need_bytes, pin, policy, node)
    if not isinstance(target, Placement):
        return list(views), None
    held = [replace(v, held_for=task_id) if v.device == target.device else v for v in views]
    return held, target.device


@dataclass(frozen=True, slots=True)
class LocalLoad:
    """Our own running tasks on one device: how many, and their VRAM the driver does not show."""

    running: int = 0
    unseen_bytes: int = 0
    #: Their reservations, seen by the driver or not.
    reserved_bytes: int = 0
    #: Their ids.
    task_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reserved:
    """The arbiter's allocations on one device (every holder, not only our tasks) and the
    memory used there outside VRAMancer."""

    count: int = 0
    bytes: int = 0
    external_bytes: int = 0


def build_views(
    snapshot: SystemSnapshot,
    now: float,
    *,
    grantable: Mapping[str, int],
    local: Mapping[str, LocalLoad],
    slots_per_device: int,
    host_slots: int,
    reserved: Mapping[str, Reserved] | None = None,
) -> list[DeviceView]:
    """Views of every GPU of ``snapshot`` (or of the host alone on a machine without GPUs).

    ``now`` is on the clock of the snapshot's ``taken_at`` (monotonic); ``grantable`` is what
    the arbiter can still grant per device name (a device missing from it: 0); ``local`` our
    running tasks per device name; ``reserved`` the arbiter's allocations per device name (for
    the reasons a task waits).
    """
    views = []
    for gpu in snapshot.gpus:
        name = gpu_name(gpu.index)
        load = local.get(name, LocalLoad())
        held = reserved.get(name, Reserved()) if reserved is not None else Reserved()
        views.append(
            DeviceView(
                device=name,
                index=gpu.index,
                total_bytes=gpu.memory_total_bytes,
                free_bytes=gpu.memory_free_bytes,
                grantable_bytes=grantable.get(name, 0),
                unseen_bytes=load.unseen_bytes,
                utilization_ratio=gpu.utilization_ratio,
                temperature_celsius=gpu.temperature_celsius,
                age_s=max(0.0, now - gpu.taken_at),
                error=gpu.error is not None,
                running=load.running,
                slots=slots_per_device,
                cuda_index=None if gpu.simulated else gpu.cuda_index,
                own_bytes=load.reserved_bytes,
                task_ids=load.task_ids,
                reservations=held.count,
                reserved_bytes=held.bytes,
                external_bytes=held.external_bytes,
            )
        )
    if not views:
        load = local.get(HOST, LocalLoad())
        views.append(
            DeviceView(
                device=HOST,
                index=None,
                total_bytes=0,
                free_bytes=0,
                running=load.running,
                slots=host_slots,
                task_ids=load.task_ids,
            )
        )
    return views

"""The VRAM arbiter: who gets GPU memory, at what quality, and who yields.

Every model load (``models/``) and every task VRAM reservation (``tasks/``) asks here first, so
the sum of what is granted never exceeds the budget: ``usable_fraction`` (0.9) of each GPU's
memory, summed, or ``[arbiter] budget``. An allocation may name a device (a ``DeviceId``,
answered as ``gpu:N``); it is then also checked against that GPU's own budget.

Every call takes typed values: one :class:`AllocationRequest` (what, at which priority, how
many bytes, where, and the holder's owner, preemptibility and ``on_preempt``). Parsing what a
user typed (sizes, enum names, device names) is the API's and the CLI's job.

* ``allocate(request)`` decides at once: an :class:`Allocation` with a quality target, or a
  typed error (``InsufficientMemory`` with requested and available bytes,
  ``InsufficientQuality``, ``ShuttingDown``). A higher priority may preempt strictly lower ones:
  they lose their allocation at once, their ``on_preempt`` callback is called and a
  ``preempted`` event is published (the model manager unloads the model or moves it to the CPU).
* ``await acquire(request)`` waits until memory frees up (``ArbiterTimeout`` after
  ``timeout_s``). Waiters are served highest priority first, then first come; a waiter that
  cannot be served holds back later ones on the same device so big requests do not starve.
* ``release_allocation`` frees memory, serves waiters, and so restores quality.
* ``headroom(device, priority=...)`` answers how much a request could be granted now, a dry run
  of the same plan (``reclaimable`` is its preemptible part); callers never redo that
  arithmetic from ``state()``.

The decisions are pure functions in ``policy.py``; this class holds the state under one lock
(any thread may call it) and performs the side effects (events, callbacks, metrics) after the
lock is released, so a callback may call back into the arbiter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from vramancer import event_types as ev
from vramancer.arbiter.errors import (
    ArbiterTimeout,
    InsufficientMemory,
    InsufficientQuality,
    Preempted,
    ShuttingDown,
)
from vramancer.arbiter.policy import (
    Budget,
    Grant,
    NoRoom,
    Plan,
    QualityPolicy,
    QualityTooLow,
    Usage,
    fit_to_budget,
    headroom,
    plan_allocation,
    pressure_ratio,
    reclaimable,
)
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.arbiter.types import (
    Allocation,
    AllocationRequest,
    ArbiterState,
    DeviceUsage,
    PreemptCallback,
    Priority,
    WorkloadType,
)
from vramancer.clock import Clock, SystemClock
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import HostSnapshot, SystemSnapshot
from vramancer.errors import InvalidInput, NotFound, VramancerError
from vramancer.events import Event, EventBus
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB, format_size

log = logging.getLogger(__name__)


class SnapshotSource(Protocol):
    """What the arbiter needs of the device manager: the latest frozen snapshot."""

    def snapshot(self) -> SystemSnapshot: ...


class _NoDevices:
    """A device source with no GPU, for an arbiter built with a given budget (``for_vram_gb``)."""

    def snapshot(self) -> SystemSnapshot:
        host = HostSnapshot(
            cpu_count=1,
            cpu_utilization_ratio=0.0,
            memory_total_bytes=0,
            memory_available_bytes=0,
            memory_used_bytes=0,
            swap_total_bytes=0,
            swap_used_bytes=0,
        )
        return SystemSnapshot(host=host)


@dataclass(slots=True)
class _Waiter:
    """An ``acquire`` call waiting for memory; resolved under the lock, woken on its loop."""

    request: AllocationRequest
    seq: int
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    allocation: Allocation | None = None
    error: VramancerError | None = None


@dataclass(slots=True)
class _Effects:
    """Side effects gathered under the lock, performed after it is released."""

    preempted: list[tuple[Allocation, PreemptCallback | None, dict[str, Any]]] = field(
        default_factory=list
    )
    granted: list[Allocation] = field(default_factory=list)
    wake: list[_Waiter] = field(default_factory=list)
    released: list[Allocation] = field(default_factory=list)


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    granted: int = 0
    denied_memory: int = 0
    denied_quality: int = 0
    timeouts: int = 0
    preemptions: int = 0
    released: int = 0
    quality_reductions: int = 0
    pressure_sum: float = 0.0
    quality_sum: dict[WorkloadType, float] = field(default_factory=dict)
    quality_count: dict[WorkloadType, int] = field(default_factory=dict)
    peak_allocated_bytes: int = 0


class Arbiter:
    """Grants VRAM by priority and quality; see the module docstring."""

    def __init__(
        self,
        settings: ArbiterSettings,
        *,
        devices: SnapshotSource,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._devices = devices
        self._events = events
        self._clock = clock
        self.policy = QualityPolicy(settings.min_qualities(), settings.pressure_low)
        self._lock = threading.RLock()
        self._allocations: dict[str, Allocation] = {}
        #: Running totals of ``_allocations`` (bytes in all, per device; count per priority).
        self._total_bytes = 0
        self._device_bytes: dict[str, int] = {}
        self._priority_count: dict[Priority, int] = {p: 0 for p in Priority}
        self._callbacks: dict[str, PreemptCallback] = {}
        self._preempted: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count(1)
        self._budget: Budget | None = None
        self._stopping = False
        self._unsubscribe: list[Any] = []
        self._stats = _Stats()
        self._started_at = clock.monotonic()
        self._m_budget = metrics.gauge(
            "vramancer_arbiter_budget_bytes", "VRAM the arbiter may hand out."
        )
        self._m_allocated = metrics.gauge(
            "vramancer_arbiter_allocated_bytes", "VRAM granted to allocations."
        )
        self._m_pressure = metrics.gauge(
            "vramancer_arbiter_pressure_ratio", "Granted VRAM over the arbiter's budget."
        )
        self._m_count = metrics.gauge(
            "vramancer_arbiter_allocations", "Live allocations by priority.", ["priority"]
        )
        self._m_preemptions = metrics.counter(
            "vramancer_arbiter_preemptions_total",
            "Allocations taken away, by the victim's priority.",
            ["priority"],
        )
        self._m_denials = metrics.counter(
            "vramancer_arbiter_denials_total",
            "Requests refused, by reason (memory, quality, timeout).",
            ["reason"],
        )
        self._m_waiters = metrics.gauge(
            "vramancer_arbiter_waiters", "acquire() calls waiting for memory."
        )
        self._m_wait = metrics.histogram(
            "vramancer_arbiter_wait_seconds", "Time acquire() waited before a grant."
        )
        self._m_count_by = {p: self._m_count.labels(priority=p.value) for p in Priority}
        self._published: dict[Any, float] = {}
        for priority in Priority:
            self._m_count_by[priority].set(0)
            self._m_preemptions.labels(priority=priority.value)
        for reason in ("memory", "quality", "timeout"):
            self._m_denials.labels(reason=reason)

    # ------------------------------------------------------------------ construction, lifecycle

    @classmethod
    def for_vram_gb(
        cls,
        vram_gb: float,
        *,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        **settings: Any,
    ) -> Arbiter:
        """An arbiter with a fixed budget of ``vram_gb`` GiB and no device detection.

        For library users and tests: ``Arbiter.for_vram_gb(24)`` hands out exactly 24 GiB.
        Extra keyword arguments are ``[arbiter]`` settings (``pressure_low``, ``min_quality`` ...).
        """
        if vram_gb < 0:
            raise InvalidInput(f"vram_gb cannot be negative (got {vram_gb})")
        real_clock = clock if clock is not None else SystemClock()
        return cls(
            ArbiterSettings(budget=int(vram_gb * GIB), **settings),
            devices=_NoDevices(),
            events=events if events is not None else EventBus(clock=real_clock.time),
            metrics=metrics if metrics is not None else Metrics(node="library"),
            clock=real_clock,
        )

    async def start(self) -> None:
        """Read the budget from the devices and follow ``device_changed`` events."""
        with self._lock:
            self._stopping = False
        self.refresh_budget()
        if not self._unsubscribe:
            self._unsubscribe.append(
                self._events.subscribe(self._on_device_changed, ev.DeviceChanged)
            )

    async def stop(self) -> None:
        """Refuse new requests (``ShuttingDown``) and fail every waiting ``acquire``."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        effects = _Effects()
        with self._lock:
            self._stopping = True
            for waiter in self._waiters:
                waiter.error = ShuttingDown("the arbiter is shutting down")
                effects.wake.append(waiter)
            self._waiters.clear()
        self._apply(effects)

    # ------------------------------------------------------------------ budget

    def _detect_budget(self) -> Budget:
        snapshot = self._devices.snapshot()
        fraction = self.settings.usable_fraction
        devices = {f"gpu:{g.index}": int(g.memory_total_bytes * fraction) for g in snapshot.gpus}
        given = self.settings.budget
        total = given if given is not None else sum(devices.values())
        return Budget(total_bytes=total, devices=devices)

    def refresh_budget(self) -> Budget:
        """Re-read the devices. If the budget shrank, holders that no longer fit are preempted
        (never-evict ones last); if it grew, waiters are served."""
        budget = self._detect_budget()
        effects = _Effects()
        with self._lock:
            old = self._budget
            self._budget = budget
            victims = fit_to_budget(list(self._allocations.values()), budget)
            for victim in victims:
                self._take_locked(victim, effects, by=None, reason="budget_shrunk")
            if not self._stopping:
                self._pump_locked(effects)
        if old is not None and old != budget:
            self._events.publish(
                ev.ArbiterBudgetChanged(
                    budget_bytes=budget.total_bytes, devices=dict(budget.devices)
                )
            )
        self._apply(effects)
        return budget

    def _on_device_changed(self, event: Event) -> None:
        try:
            self.refresh_budget()
        except Exception:  # a failed refresh keeps the last budget; the next event retries
            log.exception("arbiter budget refresh failed after %s", event.kind)

    def _budget_locked(self) -> Budget:
        if self._budget is None:
            self._budget = self._detect_budget()
        return self._budget

    @property
    def budget(self) -> Budget:
        """The current budget: in all, and per ``gpu:N``."""
        with self._lock:
            return self._budget_locked()

    # ------------------------------------------------------------------ requests

    def _admit(self, request: AllocationRequest) -> AllocationRequest:
        """The request as the arbiter plans it: no preemption when ``[arbiter] preemption`` is
        off."""
        if request.preempt and not self.settings.preemption:
            return replace(request, preempt=False)
        return request

    def _check_locked(self, request: AllocationRequest) -> Budget:
        if self._stopping:
            raise ShuttingDown("the arbiter is shutting down; no new allocations")
        budget = self._budget_locked()
        name = request.device_name
        if name is not None and name not in budget.devices:
            known = ", ".join(sorted(budget.devices)) or "none (no GPU detected)"
            raise InvalidInput(
                f"device {name!r} is not a GPU the arbiter knows; known: {known}",
                field="device",
            )
        return budget

    def allocate(self, request: AllocationRequest) -> Allocation:
        """Grant ``request`` now (preempting strictly lower priorities if needed) or raise
        ``InsufficientMemory``, ``InsufficientQuality``, ``ShuttingDown``, or ``InvalidInput``
        for a GPU the arbiter does not know. Does not queue behind ``acquire`` waiters."""
        request = self._admit(request)
        effects = _Effects()
        with tracing.span(
            "arbiter.request",
            workload_type=request.workload_type.value,
            priority=request.priority.value,
            memory_bytes=request.memory_bytes,
        ):
            with self._lock:
                budget = self._check_locked(request)
                self._stats.requests += 1
                plan = plan_allocation(
                    request,
                    list(self._allocations.values()),
                    budget,
                    self.policy,
                    self._usage_locked(),
                )
                if not isinstance(plan, Grant):
                    raise self._denial_locked(plan)
                allocation = self._grant_locked(request, plan, effects)
            self._apply(effects)
            return allocation

    async def acquire(
        self, request: AllocationRequest, *, timeout_s: float | None = None
    ) -> Allocation:
        """Like ``allocate`` but wait up to ``timeout_s`` (default ``acquire_timeout_s``) for
        memory to free up, in line with other waiters.

        A request that could never fit (bigger than the budget, or a quality unreachable even
        with the GPU empty) fails at once with ``InsufficientMemory`` / ``InsufficientQuality``.
        After the wait: ``ArbiterTimeout``; on stop: ``ShuttingDown``. Cancelling the caller
        never leaks a grant.
        """
        request = self._admit(request)
        timeout = self.settings.acquire_timeout_s if timeout_s is None else timeout_s
        if timeout < 0:
            raise InvalidInput(f"timeout_s cannot be negative (got {timeout_s})", field="timeout_s")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            request=request,
            seq=next(self._seq),
            loop=loop,
            event=asyncio.Event(),
        )
        effects = _Effects()
        started = self._clock.monotonic()
        with self._lock:
            budget = self._check_locked(request)
            self._stats.requests += 1
            impossible = plan_allocation(request, [], budget, self.policy)
            if not isinstance(impossible, Grant):
                raise self._denial_locked(impossible)
            self._waiters.append(waiter)
            self._pump_locked(effects)
            self._m_waiters.set(len(self._waiters))
        self._apply(effects, skip_wake=waiter)
        if waiter.allocation is None:
            await self._wait(waiter, timeout)
        self._m_wait.observe(max(0.0, self._clock.monotonic() - started))
        assert waiter.allocation is not None
        return waiter.allocation

    async def _wait(self, waiter: _Waiter, timeout: float) -> None:
        """Wait for ``waiter`` to be served; leaves ``waiter.allocation`` set or raises."""
        try:
            await asyncio.wait_for(waiter.event.wait(), timeout)
        except TimeoutError:
            pass
        except BaseException:  # cancelled: give back a grant that raced the cancellation
            with self._lock:
                self._drop_waiter_locked(waiter)
                granted = waiter.allocation
            if granted is not None:
                self.release_allocation(granted.id)
            raise
        with self._lock:
            if waiter.allocation is not None:
                return
            self._drop_waiter_locked(waiter)
            if waiter.error is not None:
                raise waiter.error
            self._stats.timeouts += 1
            request = waiter.request
            available = self._available_locked(request.device_name)
        self._m_denials.labels(reason="timeout").inc()
        raise ArbiterTimeout(
            f"waited {timeout:g} s for {format_size(request.memory_bytes)} of VRAM "
            f"({format_size(available)} free)",
            timeout_s=timeout,
            requested_bytes=request.memory_bytes,
            available_bytes=available,
            device=request.device_name,
        )

    def _drop_waiter_locked(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._m_waiters.set(len(self._waiters))

    @asynccontextmanager
    async def reserve(
        self, request: AllocationRequest, *, timeout_s: float | None = None
    ) -> AsyncIterator[Allocation]:
        """``async with arbiter.reserve(request) as allocation:`` acquire, then always release."""
        allocation = await self.acquire(request, timeout_s=timeout_s)
        try:
            yield allocation
        finally:
            self.release_allocation(allocation.id)

    def release_allocation(self, allocation_id: str | Allocation) -> None:
        """Free an allocation (its id, or the record) and serve waiters. Releasing one that was
        preempted does nothing (the holder's clean-up may race the preemption); an unknown or
        already released id raises ``NotFound``."""
        if isinstance(allocation_id, Allocation):
            allocation_id = allocation_id.id
        effects = _Effects()
        with self._lock:
            held = self._remove_locked(allocation_id)
            if held is None:
                if allocation_id in self._preempted:
                    return
                raise NotFound(f"no allocation {allocation_id!r}", allocation_id=allocation_id)
            self._callbacks.pop(allocation_id, None)
            self._stats.released += 1
            effects.released.append(held)
            if not self._stopping:
                self._pump_locked(effects)
        self._apply(effects)

    # ------------------------------------------------------------------ locked internals

    def _grant_locked(
        self, request: AllocationRequest, plan: Grant, effects: _Effects
    ) -> Allocation:
        seq = next(self._seq)
        allocation = Allocation(
            id=f"alloc-{seq}",
            workload_type=request.workload_type,
            priority=request.priority,
            memory_bytes=request.memory_bytes,
            quality_target=plan.quality_target,
            device=request.device_name,
            owner=request.owner,
            created_at=self._clock.time(),
            seq=seq,
            preemptible=request.preemptible,
            min_quality=request.min_quality,
        )
        for victim in plan.victims:
            self._take_locked(victim, effects, by=allocation, reason="preempted")
        self._insert_locked(allocation)
        if request.on_preempt is not None:
            self._callbacks[allocation.id] = request.on_preempt
        stats = self._stats
        stats.granted += 1
        stats.pressure_sum += plan.pressure_ratio
        kind = request.workload_type
        stats.quality_sum[kind] = stats.quality_sum.get(kind, 0.0) + plan.quality_target
        stats.quality_count[kind] = stats.quality_count.get(kind, 0) + 1
        if plan.quality_target < 1.0:
            stats.quality_reductions += 1
        stats.peak_allocated_bytes = max(stats.peak_allocated_bytes, self._allocated_locked())
        effects.granted.append(allocation)
        return allocation

    def _take_locked(
        self, victim: Allocation, effects: _Effects, *, by: Allocation | None, reason: str
    ) -> None:
        self._remove_locked(victim.id)
        callback = self._callbacks.pop(victim.id, None)
        info: dict[str, Any] = {
            "reason": reason,
            "by": by.id if by is not None else None,
            "by_priority": by.priority.value if by is not None else None,
            "by_owner": by.owner if by is not None else None,
        }
        if self.settings.preempted_history > 0:
            self._preempted[victim.id] = info
            while len(self._preempted) > self.settings.preempted_history:
                self._preempted.popitem(last=False)
        self._stats.preemptions += 1
        effects.preempted.append((victim, callback, info))

    def _denial_locked(self, plan: Plan) -> VramancerError:
        if isinstance(plan, NoRoom):
            self._stats.denied_memory += 1
            self._m_denials.labels(reason="memory").inc()
            where = f"on {plan.device}" if plan.device else "in the arbiter's budget"
            return InsufficientMemory(
                f"not enough VRAM: requested {format_size(plan.requested_bytes)}, "
                f"{format_size(plan.available_bytes)} available {where} "
                f"(budget {format_size(plan.budget_bytes)}, "
                f"{format_size(plan.reclaimable_bytes)} held by lower priorities)",
                requested_bytes=plan.requested_bytes,
                available_bytes=plan.available_bytes,
                reclaimable_bytes=plan.reclaimable_bytes,
                budget_bytes=plan.budget_bytes,
                device=plan.device,
            )
        assert isinstance(plan, QualityTooLow)
        self._stats.denied_quality += 1
        self._m_denials.labels(reason="quality").inc()
        return InsufficientQuality(
            f"cannot reach quality {plan.minimum_quality:g}: at most "
            f"{plan.available_quality:g} under the current memory pressure",
            minimum_quality=plan.minimum_quality,
            available_quality=plan.available_quality,
            device=plan.device,
        )

    def _pump_locked(self, effects: _Effects) -> None:
        """Serve waiters: highest priority first, then oldest. A waiter that cannot be served
        holds back the rest on its device (all of them if it names no device)."""
        if not self._waiters:
            return
        budget = self._budget_locked()
        blocked_all = False
        blocked: set[str] = set()
        order = sorted(self._waiters, key=lambda w: (-w.request.priority.rank, w.seq))
        for waiter in order:
            device = waiter.request.device_name
            if blocked_all or (device is not None and device in blocked):
                continue
            plan = plan_allocation(
                waiter.request,
                list(self._allocations.values()),
                budget,
                self.policy,
                self._usage_locked(),
            )
            if isinstance(plan, Grant):
                waiter.allocation = self._grant_locked(waiter.request, plan, effects)
                self._waiters.remove(waiter)
                effects.wake.append(waiter)
            elif device is None:
                blocked_all = True
            else:
                blocked.add(device)
        self._m_waiters.set(len(self._waiters))

    def _insert_locked(self, allocation: Allocation) -> None:
        self._allocations[allocation.id] = allocation
        self._total_bytes += allocation.memory_bytes
        if allocation.device is not None:
            device = allocation.device
            self._device_bytes[device] = self._device_bytes.get(device, 0) + allocation.memory_bytes
        self._priority_count[allocation.priority] += 1

    def _remove_locked(self, allocation_id: str) -> Allocation | None:
        allocation = self._allocations.pop(allocation_id, None)
        if allocation is None:
            return None
        self._total_bytes -= allocation.memory_bytes
        if allocation.device is not None:
            self._device_bytes[allocation.device] -= allocation.memory_bytes
        self._priority_count[allocation.priority] -= 1
        return allocation

    def _allocated_locked(self, device: str | None = None) -> int:
        if device is None:
            return self._total_bytes
        return self._device_bytes.get(device, 0)

    def _usage_locked(self) -> Usage:
        return Usage(self._total_bytes, dict(self._device_bytes))

    def _available_locked(self, device: str | None) -> int:
        budget = self._budget_locked()
        free = budget.total_bytes - self._allocated_locked()
        if device is not None:
            free = min(free, budget.devices.get(device, 0) - self._allocated_locked(device))
        return max(0, free)

    # ------------------------------------------------------------------ side effects

    def _apply(self, effects: _Effects, skip_wake: _Waiter | None = None) -> None:
        """Publish events, call preemption callbacks, wake waiters, update metrics."""
        for victim, callback, info in effects.preempted:
            self._m_preemptions.labels(priority=victim.priority.value).inc()
            if callback is not None:
                try:
                    callback(victim)
                except Exception:
                    log.exception("on_preempt callback of %s failed", victim.id)
            self._events.publish(
                ev.Preempted(
                    allocation_id=victim.id,
                    owner=victim.owner,
                    workload_type=victim.workload_type.value,
                    priority=victim.priority.value,
                    memory_bytes=victim.memory_bytes,
                    device=victim.device,
                    reason=info["reason"],
                    by=info["by"],
                    by_priority=info["by_priority"],
                    by_owner=info["by_owner"],
                )
            )
        for allocation in effects.granted:
            self._events.publish(_allocation_event(ev.AllocationGranted, allocation))
        for allocation in effects.released:
            self._events.publish(_allocation_event(ev.AllocationReleased, allocation))
        for waiter in effects.wake:
            if waiter is skip_wake:
                continue
            try:
                waiter.loop.call_soon_threadsafe(waiter.event.set)
            except RuntimeError:  # its loop is closed: nobody will take the grant
                if waiter.allocation is not None:
                    self.release_allocation(waiter.allocation.id)
        self._update_gauges()

    def _update_gauges(self) -> None:
        """Set the gauges whose value changed since the last call (each set has a cost)."""
        with self._lock:
            budget = self._budget_locked()
            values: dict[Any, float] = {
                self._m_budget: budget.total_bytes,
                self._m_allocated: self._total_bytes,
                self._m_pressure: pressure_ratio(self._total_bytes, budget.total_bytes),
            }
            for priority, count in self._priority_count.items():
                values[self._m_count_by[priority]] = count
            changed = [(g, v) for g, v in values.items() if self._published.get(g) != v]
            self._published.update(changed)
        for gauge, value in changed:
            gauge.set(value)

    # ------------------------------------------------------------------ queries

    def recommended_quality(
        self,
        workload_type: WorkloadType,
        priority: Priority = Priority.NORMAL,
        *,
        device: DeviceId | None = None,
    ) -> float:
        """The quality ``workload_type`` should run at now, at ``priority`` (default normal),
        under the current pressure (of ``device`` too, if named)."""
        name = str(device) if device is not None else None
        with self._lock:
            budget = self._budget_locked()
            pressure = pressure_ratio(self._allocated_locked(), budget.total_bytes)
            if name is not None:
                pressure = max(
                    pressure,
                    pressure_ratio(self._allocated_locked(name), budget.devices.get(name, 0)),
                )
        return self.policy.quality(workload_type, priority, pressure)

    def reserved_bytes(self, device: DeviceId | None = None) -> int:
        """Bytes granted: on ``device`` (allocations naming it), or in all when ``device`` is
        None."""
        with self._lock:
            return self._allocated_locked(str(device) if device is not None else None)

    def headroom(
        self,
        device: DeviceId | None = None,
        *,
        priority: Priority | None = None,
        spare: Callable[[Allocation], bool] | None = None,
    ) -> int:
        """Bytes a request naming ``device`` (None: the whole budget) could be granted now: a
        dry run of the arbiter's own plan (``policy.headroom``), nothing is changed.

        ``priority``: count what a request of that priority would preempt (strictly lower,
        preemptible holders; nothing when ``[arbiter] preemption`` is off); None: the free
        budget only. ``spare``: holders the caller does not count on (the model manager spares
        models, which it evicts in its own order). A CPU, another node's GPU or a GPU the
        arbiter does not know has no headroom.
        """
        if device is not None and (device.is_cpu or not device.is_local):
            return 0
        if not self.settings.preemption:
            priority = None
        with self._lock:
            return headroom(
                self._allocations.values(),
                self._budget_locked(),
                device=str(device) if device is not None else None,
                priority=priority,
                spare=spare,
                usage=self._usage_locked(),
            )

    def reclaimable(
        self,
        device: DeviceId | None = None,
        *,
        priority: Priority | None,
        spare: Callable[[Allocation], bool] | None = None,
    ) -> int:
        """Bytes a request of ``priority`` would preempt on ``device`` (None: anywhere), less
        the ``spare``d holders; 0 when ``[arbiter] preemption`` is off. Part of ``headroom``."""
        if device is not None and (device.is_cpu or not device.is_local):
            return 0
        if not self.settings.preemption:
            return 0
        with self._lock:
            return reclaimable(
                self._allocations.values(),
                device=str(device) if device is not None else None,
                priority=priority,
                spare=spare,
            )

    def allocations(self) -> list[Allocation]:
        """Live allocations, oldest first."""
        with self._lock:
            return sorted(self._allocations.values(), key=lambda a: a.seq)

    def set_preemptible(self, allocation_id: str, preemptible: bool) -> bool:
        """Make a live allocation a possible victim of preemption again, or not. The model
        manager turns it off while a model is in use (it is never evicted under its user).
        False when the id is not live (released, or preempted already)."""
        with self._lock:
            held = self._allocations.get(allocation_id)
            if held is None:
                return False
            if held.preemptible != preemptible:
                self._allocations[allocation_id] = replace(held, preemptible=preemptible)
            return True

    def get(self, allocation_id: str) -> Allocation:
        """The live allocation ``allocation_id``; ``Preempted`` if it was taken, else
        ``NotFound``. Holders call it to check they still own their memory."""
        with self._lock:
            held = self._allocations.get(allocation_id)
            if held is not None:
                return held
            info = self._preempted.get(allocation_id)
        if info is not None:
            raise Preempted(
                f"allocation {allocation_id!r} was preempted ({info['reason']})",
                allocation_id=allocation_id,
                **info,
            )
        raise NotFound(f"no allocation {allocation_id!r}", allocation_id=allocation_id)

    def state(self) -> ArbiterState:
        """A frozen picture: budget, allocations, pressure, qualities, per-device usage."""
        with self._lock:
            budget = self._budget_locked()
            allocations = tuple(sorted(self._allocations.values(), key=lambda a: a.seq))
            allocated = self._allocated_locked()
            devices = tuple(
                DeviceUsage(name, size, self._allocated_locked(name))
                for name, size in sorted(budget.devices.items())
            )
            waiters = len(self._waiters)
            stopping = self._stopping
        pressure = pressure_ratio(allocated, budget.total_bytes)
        qualities = {
            kind: self.policy.quality(kind, Priority.NORMAL, pressure) for kind in WorkloadType
        }
        active = {
            kind: sum(1 for a in allocations if a.workload_type is kind) for kind in WorkloadType
        }
        return ArbiterState(
            budget_bytes=budget.total_bytes,
            allocated_bytes=allocated,
            allocations=allocations,
            available_bytes=max(0, budget.total_bytes - allocated),
            pressure_ratio=pressure,
            qualities=qualities,
            active=active,
            devices=devices,
            waiters=waiters,
            shutting_down=stopping,
        )

    def stats(self) -> dict[str, Any]:
        """Counters since construction: requests, grants, denials by reason, preemptions."""
        with self._lock:
            s = self._stats
            denied = s.denied_memory + s.denied_quality + s.timeouts
            return {
                "total_allocations": s.requests,
                "successful_allocations": s.granted,
                "failed_allocations": denied,
                "denied": {
                    "memory": s.denied_memory,
                    "quality": s.denied_quality,
                    "timeout": s.timeouts,
                },
                "released": s.released,
                "preemptions": s.preemptions,
                "quality_reductions": s.quality_reductions,
                "avg_memory_pressure": s.pressure_sum / s.granted if s.granted else 0.0,
                "avg_quality": {
                    kind.value: s.quality_sum[kind] / s.quality_count[kind]
                    for kind in sorted(s.quality_count)
                },
                "peak_allocated_bytes": s.peak_allocated_bytes,
                "waiters": len(self._waiters),
                "uptime_s": max(0.0, self._clock.monotonic() - self._started_at),
            }


def _allocation_event(
    cls: type[ev.AllocationGranted] | type[ev.AllocationReleased], allocation: Allocation
) -> ev.AllocationGranted | ev.AllocationReleased:
    return cls(
        id=allocation.id,
        workload_type=allocation.workload_type.value,
        priority=allocation.priority.value,
        memory_bytes=allocation.memory_bytes,
        quality_target=allocation.quality_target,
        device=allocation.device,
        owner=allocation.owner,
        created_at=allocation.created_at,
        preemptible=allocation.preemptible,
        min_quality=allocation.min_quality,
    )

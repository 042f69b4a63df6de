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

The decisions are pure functions in ``policy.py``; this class is the facade over one module
per concept: ``budget.py`` (per-GPU budgets from the devices), ``table.py`` (the allocations
and the one lock, any thread may call), ``waiters.py`` (the ``acquire`` queue), ``effects.py``
(callbacks, events, metrics) and ``reports.py`` (quality, ``state()``, ``stats()``).

Lock discipline: a call changes the table under ``table.lock`` and only records in an
``Effects`` what must follow; ``EffectRunner.apply`` performs it after the lock is released,
so a preemption callback or an event subscriber may call back into the arbiter.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from vramancer import event_types as ev
from vramancer.arbiter import reports
from vramancer.arbiter.budget import BudgetKeeper, NoDevices, SnapshotSource
from vramancer.arbiter.effects import ArbiterMetrics, EffectRunner, Effects
from vramancer.arbiter.errors import ArbiterTimeout, Preempted, ShuttingDown, denial
from vramancer.arbiter.policy import (
    Budget,
    Grant,
    NoRoom,
    Plan,
    QualityPolicy,
    QualityTooLow,
    fit_to_budget,
    headroom,
    plan_allocation,
    quality_reason,
    reclaimable,
)
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.arbiter.table import AllocationTable
from vramancer.arbiter.types import (
    Allocation,
    AllocationRequest,
    ArbiterState,
    Priority,
    WorkloadType,
)
from vramancer.arbiter.waiters import Waiter, WaitQueue
from vramancer.clock import Clock, SystemClock
from vramancer.devices.ids import DeviceId
from vramancer.errors import InvalidInput, NotFound, VramancerError
from vramancer.events import Event, EventBus
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics
from vramancer.units import GIB, format_size

__all__ = ["Arbiter", "SnapshotSource"]

log = logging.getLogger(__name__)


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
        self._events = events
        self._clock = clock
        self.policy = QualityPolicy(settings.min_qualities(), settings.pressure_low)
        self._table = AllocationTable(settings.preempted_history)
        self._budgets = BudgetKeeper(settings, devices)
        self._m = ArbiterMetrics(metrics)
        self._waiters = WaitQueue(self._m.waiters)
        self._effects = EffectRunner(
            self._table,
            budget=self._budgets.current,
            events=events,
            metrics=self._m,
            release=self.release_allocation,
        )
        self._stats = reports.Stats()
        self._stopping = False
        self._unsubscribe: list[Any] = []
        self._started_at = clock.monotonic()

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
            devices=NoDevices(),
            events=events if events is not None else EventBus(clock=real_clock.time),
            metrics=metrics if metrics is not None else Metrics(node="library"),
            clock=real_clock,
        )

    async def start(self) -> None:
        """Read the budget from the devices and follow ``device_changed`` events."""
        with self._table.lock:
            self._stopping = False
        self.refresh_budget()
        if not self._unsubscribe:
            self._unsubscribe.append(
                self._events.subscribe(self._on_device_changed, ev.DeviceChanged)
            )
            # memory used outside VRAMancer freed up: a waiter may fit now
            self._unsubscribe.append(self._events.subscribe(self._on_vram_changed, ev.VramChanged))

    async def stop(self) -> None:
        """Refuse new requests (``ShuttingDown``) and fail every waiting ``acquire``."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        effects = Effects()
        with self._table.lock:
            self._stopping = True
            effects.wake.extend(
                self._waiters.fail_all(ShuttingDown("the arbiter is shutting down"))
            )
        self._effects.apply(effects)

    # ------------------------------------------------------------------ budget

    def refresh_budget(self) -> Budget:
        """Re-read the devices. If the budget shrank, holders that no longer fit are preempted
        (never-evict ones last); if it grew, waiters are served."""
        budget = self._budgets.detect()
        effects = Effects()
        with self._table.lock:
            old = self._budgets.replace(budget)
            victims = fit_to_budget(list(self._table.allocations.values()), budget)
            for victim in victims:
                self._take_locked(victim, effects, by=None, reason="budget_shrunk")
            if not self._stopping:
                self._serve_locked(effects)
        if old is not None and old != budget:
            self._events.publish(
                ev.ArbiterBudgetChanged(
                    budget_bytes=budget.total_bytes, devices=dict(budget.devices)
                )
            )
        self._effects.apply(effects)
        return budget

    def _on_device_changed(self, event: Event) -> None:
        try:
            self.refresh_budget()
        except Exception:  # a failed refresh keeps the last budget; the next event retries
            log.exception("arbiter budget refresh failed after %s", event.kind)

    def _on_vram_changed(self, event: Event) -> None:
        effects = Effects()
        with self._table.lock:
            if self._stopping or not len(self._waiters):
                return
            self._serve_locked(effects)
        self._effects.apply(effects)

    @property
    def budget(self) -> Budget:
        """The current budget: in all, and per ``gpu:N``."""
        with self._table.lock:
            return self._budgets.current()

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
        budget = self._budgets.current()
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
        effects = Effects()
        with tracing.span(
            "arbiter.request",
            workload_type=request.workload_type.value,
            priority=request.priority.value,
            memory_bytes=request.memory_bytes,
        ):
            with self._table.lock:
                self._check_locked(request)
                self._stats.requests += 1
                plan = self._plan_locked(request)
                if not isinstance(plan, Grant):
                    raise self._denial_locked(plan)
                allocation = self._grant_locked(request, plan, effects)
            self._effects.apply(effects)
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
        waiter = Waiter.here(request, self._table.next_seq())
        effects = Effects()
        started = self._clock.monotonic()
        with self._table.lock:
            budget = self._check_locked(request)
            self._stats.requests += 1
            impossible = plan_allocation(request, [], budget, self.policy)
            if not isinstance(impossible, Grant):
                raise self._denial_locked(impossible)
            self._waiters.add(waiter)
            self._serve_locked(effects)
            self._waiters.publish()
        self._effects.apply(effects, skip_wake=waiter)
        if waiter.allocation is None:
            await self._wait(waiter, timeout)
        self._m.wait.observe(max(0.0, self._clock.monotonic() - started))
        assert waiter.allocation is not None
        return waiter.allocation

    async def _wait(self, waiter: Waiter, timeout: float) -> None:
        """Wait for ``waiter`` to be served; leaves ``waiter.allocation`` set or raises."""
        try:
            await waiter.wait(timeout)
        except BaseException:  # cancelled: give back a grant that raced the cancellation
            with self._table.lock:
                self._waiters.drop(waiter)
                granted = waiter.allocation
            if granted is not None:
                self.release_allocation(granted.id)
            raise
        with self._table.lock:
            if waiter.allocation is not None:
                return
            self._waiters.drop(waiter)
            if waiter.error is not None:
                raise waiter.error
            self._stats.timeouts += 1
            request = waiter.request
            budget = self._budgets.for_grants(self._table.usage_locked())
            available = self._table.available_locked(budget, request.device_name)
        self._m.deny("timeout")
        raise ArbiterTimeout(
            f"waited {timeout:g} s for {format_size(request.memory_bytes)} of VRAM "
            f"({format_size(available)} free)",
            timeout_s=timeout,
            requested_bytes=request.memory_bytes,
            available_bytes=available,
            device=request.device_name,
        )

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
        effects = Effects()
        with self._table.lock:
            held = self._table.remove_locked(allocation_id)
            if held is None:
                if self._table.preempted_locked(allocation_id) is not None:
                    return
                raise NotFound(f"no allocation {allocation_id!r}", allocation_id=allocation_id)
            self._stats.released += 1
            effects.released.append(held)
            if not self._stopping:
                self._serve_locked(effects)
        self._effects.apply(effects)

    # ------------------------------------------------------------------ locked steps

    def _plan_locked(self, request: AllocationRequest) -> Plan:
        """Plan against the budget less the memory used outside VRAMancer now."""
        table = self._table
        usage = table.usage_locked()
        budget = self._budgets.for_grants(usage)
        return plan_allocation(
            request, list(table.allocations.values()), budget, self.policy, usage
        )

    def _grant_locked(
        self, request: AllocationRequest, plan: Grant, effects: Effects
    ) -> Allocation:
        seq = self._table.next_seq()
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
        self._table.insert_locked(allocation, request.on_preempt)
        self._stats.record_grant(request.workload_type, plan, self._table.total_bytes)
        effects.granted.append(allocation)
        return allocation

    def _take_locked(
        self, victim: Allocation, effects: Effects, *, by: Allocation | None, reason: str
    ) -> None:
        callback, info = self._table.take_locked(victim, by=by, reason=reason)
        self._stats.preemptions += 1
        effects.preempted.append((victim, callback, info))

    def _denial_locked(self, plan: NoRoom | QualityTooLow) -> VramancerError:
        if isinstance(plan, NoRoom):
            self._stats.denied_memory += 1
            self._m.deny("memory")
        else:
            self._stats.denied_quality += 1
            self._m.deny("quality")
        return denial(plan)

    def _serve_locked(self, effects: Effects) -> None:
        """Serve the waiters that fit now (see ``waiters.py`` for the order)."""

        def try_grant(request: AllocationRequest) -> Allocation | None:
            plan = self._plan_locked(request)
            return self._grant_locked(request, plan, effects) if isinstance(plan, Grant) else None

        effects.wake.extend(self._waiters.serve(try_grant))

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
        with self._table.lock:
            pressure = reports.pressure_locked(self._table, self._budgets.current(), name)
        return self.policy.quality(workload_type, priority, pressure)

    def quality_reason(self, allocation: Allocation) -> str:
        """What ``allocation.quality_target`` means and why (``policy.quality_reason``)."""
        return quality_reason(allocation, self.policy)

    def reserved_bytes(self, device: DeviceId | None = None) -> int:
        """Bytes granted: on ``device`` (allocations naming it), or in all when ``device`` is
        None."""
        with self._table.lock:
            return self._table.allocated_locked(str(device) if device is not None else None)

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
        with self._table.lock:
            usage = self._table.usage_locked()
            return headroom(
                self._table.allocations.values(),
                self._budgets.for_grants(usage),
                device=str(device) if device is not None else None,
                priority=priority,
                spare=spare,
                usage=usage,
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
        with self._table.lock:
            return reclaimable(
                self._table.allocations.values(),
                device=str(device) if device is not None else None,
                priority=priority,
                spare=spare,
            )

    def allocations(self) -> list[Allocation]:
        """Live allocations, oldest first."""
        with self._table.lock:
            return self._table.by_age_locked()

    def set_preemptible(self, allocation_id: str, preemptible: bool) -> bool:
        """Make a live allocation a possible victim of preemption again, or not. The model
        manager turns it off while a model is in use (it is never evicted under its user).
        False when the id is not live (released, or preempted already)."""
        with self._table.lock:
            return self._table.set_preemptible_locked(allocation_id, preemptible)

    def get(self, allocation_id: str) -> Allocation:
        """The live allocation ``allocation_id``; ``Preempted`` if it was taken, else
        ``NotFound``. Holders call it to check they still own their memory."""
        with self._table.lock:
            held = self._table.allocations.get(allocation_id)
            if held is not None:
                return held
            info = self._table.preempted_locked(allocation_id)
        if info is not None:
            raise Preempted(
                f"allocation {allocation_id!r} was preempted ({info['reason']})",
                allocation_id=allocation_id,
                **info,
            )
        raise NotFound(f"no allocation {allocation_id!r}", allocation_id=allocation_id)

    def state(self) -> ArbiterState:
        """A frozen picture: budget, allocations, pressure, qualities, per-device usage."""
        table = self._table
        with table.lock:
            budget = self._budgets.for_grants(table.usage_locked())
            allocations = tuple(table.by_age_locked())
            allocated = table.allocated_locked()
            devices = reports.device_usage_locked(table, budget)
            waiters = len(self._waiters)
            stopping = self._stopping
        return reports.arbiter_state(
            self.policy,
            budget,
            allocations,
            allocated=allocated,
            devices=devices,
            waiters=waiters,
            stopping=stopping,
        )

    def stats(self) -> dict[str, Any]:
        """Counters since construction: requests, grants, denials by reason, preemptions."""
        with self._table.lock:
            return self._stats.report(
                waiters=len(self._waiters),
                uptime_s=max(0.0, self._clock.monotonic() - self._started_at),
            )

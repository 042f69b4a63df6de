"""The arbiter's pure decisions: quality under pressure, grant or not, and whom to preempt.

No I/O, no clock, no locks: ``plan_allocation`` takes the budget, the current allocations and a
request and returns a plan value — :class:`Grant` (with a quality target and the victims to
preempt first, possibly none), :class:`NoRoom` or :class:`QualityTooLow`. The service in
``arbiter.py`` applies it.

Quality (LLMs run at 40–100 %, diffusion at 30–100 % by default)
    ``pressure`` is allocated / budget after the grant, the larger of the whole budget's and the
    named device's. Each priority has a knee ``low_p = pressure_low + (1 - pressure_low) ×
    headroom_p``; up to it quality is 1.0, then it falls linearly to the workload type's minimum
    at pressure 1.0. A higher priority has a later knee, so at equal pressure it never gets a
    lower quality; quality depends on the pressure only, so releasing memory restores it.

Preemption
    Only holders of a strictly lower priority that are ``preemptible`` may be taken. They are
    considered lowest priority first, then most recent first (highest ``seq``); each one that
    helps a constraint still violated is taken until the request fits. Then the set is pruned,
    least preferred victim first: one whose release is not needed any more (a later, larger one
    covered it) is spared. The order, and so the result, is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vramancer.arbiter.types import Allocation, AllocationRequest, Priority, WorkloadType

#: Where, between ``pressure_low`` (0) and full pressure (1), each priority's quality starts to
#: fall. Later knees for higher priorities: a person waiting gets full quality longest.
PRIORITY_HEADROOM: Mapping[Priority, float] = {
    Priority.BACKGROUND: 0.0,
    Priority.NORMAL: 0.1,
    Priority.HIGH: 0.2,
    Priority.USER_FACING: 0.4,
}

#: Tolerance when comparing a computed quality with an asked minimum.
QUALITY_EPSILON = 1e-9


def pressure_ratio(allocated_bytes: int, budget_bytes: int) -> float:
    """allocated / budget; a zero budget is full pressure (there is no memory to give)."""
    if budget_bytes <= 0:
        return 1.0
    return allocated_bytes / budget_bytes


@dataclass(frozen=True, slots=True)
class QualityPolicy:
    """Quality target of a workload type at a priority under a memory pressure."""

    min_quality: Mapping[WorkloadType, float]
    pressure_low: float = 0.5

    def knee(self, priority: Priority) -> float:
        """Pressure up to which ``priority`` runs at full quality."""
        return self.pressure_low + (1.0 - self.pressure_low) * PRIORITY_HEADROOM[priority]

    def quality(self, workload_type: WorkloadType, priority: Priority, pressure: float) -> float:
        """1.0 up to the priority's knee, then linearly down to the minimum at pressure 1.0."""
        minimum = self.min_quality[workload_type]
        knee = self.knee(priority)
        if pressure <= knee:
            return 1.0
        ramp = min(1.0, (pressure - knee) / (1.0 - knee))
        return round(1.0 - (1.0 - minimum) * ramp, 6)


@dataclass(frozen=True, slots=True)
class Budget:
    """What the arbiter may hand out: in all, and per GPU (``gpu:N`` → bytes).

    ``external`` is the memory used outside VRAMancer per GPU now (driver-used less what is
    reserved, ``devices.holders.external_bytes``) and ``memory`` each GPU's size: external
    memory is never granted. It first fills the margin the budget leaves (``memory - budget``,
    where driver contexts live); beyond it, it comes off the GPU's budget (``grantable``) and
    so off the total. It only limits new grants: nobody is preempted for it.
    """

    total_bytes: int
    devices: Mapping[str, int] = field(default_factory=dict)
    external: Mapping[str, int] = field(default_factory=dict)
    memory: Mapping[str, int] = field(default_factory=dict)

    def outside(self, device: str) -> int:
        """Bytes of ``device``'s budget that memory used outside VRAMancer takes."""
        used = self.external.get(device, 0)
        if used <= 0:
            return 0
        budget = self.devices.get(device, 0)
        margin = max(0, self.memory.get(device, budget) - budget)
        return min(budget, max(0, used - margin))

    def grantable(self, device: str) -> int:
        """``device``'s budget less what memory used outside VRAMancer takes of it."""
        return self.devices.get(device, 0) - self.outside(device)

    @property
    def grantable_total(self) -> int:
        """The total budget less what memory used outside VRAMancer takes of every GPU's."""
        taken = sum(self.outside(device) for device in self.external)
        return max(0, self.total_bytes - taken)


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes granted: in all, and per device (allocations naming it)."""

    total_bytes: int
    devices: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, allocations: Iterable[Allocation]) -> Usage:
        total = 0
        devices: dict[str, int] = {}
        for a in allocations:
            total += a.memory_bytes
            if a.device is not None:
                devices[a.device] = devices.get(a.device, 0) + a.memory_bytes
        return cls(total, devices)


@dataclass(frozen=True, slots=True)
class Grant:
    """Grant the request at ``quality_target`` after preempting ``victims`` (often none)."""

    quality_target: float
    pressure_ratio: float
    victims: tuple[Allocation, ...] = ()


@dataclass(frozen=True, slots=True)
class NoRoom:
    """The memory does not fit, even after preempting every eligible lower-priority holder.

    ``available_bytes`` is free now in the tighter of the total and the device budget;
    ``reclaimable_bytes`` is what preempting every eligible holder there would add.
    """

    requested_bytes: int
    available_bytes: int
    reclaimable_bytes: int
    budget_bytes: int
    device: str | None = None
    #: Memory used outside VRAMancer on ``device`` (on every GPU without one): not grantable.
    external_bytes: int = 0


@dataclass(frozen=True, slots=True)
class QualityTooLow:
    """The memory fits, but not at ``minimum_quality``; ``available_quality`` is the best."""

    minimum_quality: float
    available_quality: float
    device: str | None = None


Plan = Grant | NoRoom | QualityTooLow


def victim_order(allocations: Iterable[Allocation]) -> list[Allocation]:
    """Lowest priority first, then most recent first (highest ``seq``), then id."""
    return sorted(allocations, key=lambda a: (a.priority.rank, -a.seq, a.id))


def _sum_bytes(allocations: Sequence[Allocation], device: str | None = None) -> int:
    if not allocations:
        return 0
    if device is None:
        return sum(a.memory_bytes for a in allocations)
    return sum(a.memory_bytes for a in allocations if a.device == device)


@dataclass(frozen=True, slots=True)
class _Scope:
    """The constraints one request must meet: the total budget and, if named, its device's."""

    request: AllocationRequest
    policy: QualityPolicy
    total_budget: int
    total_allocated: int
    device_budget: int
    device_allocated: int

    def _after(self, freed: Sequence[Allocation]) -> tuple[int, int]:
        total = self.total_allocated - _sum_bytes(freed) + self.request.memory_bytes
        if self.request.device_name is None:
            return total, 0
        device = (
            self.device_allocated
            - _sum_bytes(freed, self.request.device_name)
            + self.request.memory_bytes
        )
        return total, device

    def pressure(self, freed: Sequence[Allocation]) -> float:
        total, device = self._after(freed)
        pressure = pressure_ratio(total, self.total_budget)
        if self.request.device_name is not None:
            pressure = max(pressure, pressure_ratio(device, self.device_budget))
        return pressure

    def quality(self, freed: Sequence[Allocation]) -> float:
        r = self.request
        return self.policy.quality(r.workload_type, r.priority, self.pressure(freed))

    def memory_fits(self, freed: Sequence[Allocation]) -> bool:
        total, device = self._after(freed)
        if total > self.total_budget:
            return False
        return self.request.device_name is None or device <= self.device_budget

    def quality_ok(self, quality: float) -> bool:
        minimum = self.request.min_quality
        return minimum is None or quality >= minimum - QUALITY_EPSILON

    def satisfied(self, freed: Sequence[Allocation]) -> bool:
        return self.memory_fits(freed) and self.quality_ok(self.quality(freed))

    def total_side_violated(self, freed: Sequence[Allocation]) -> bool:
        """Is the whole-budget constraint (memory or quality) one of those not met?"""
        total, _ = self._after(freed)
        if total > self.total_budget:
            return True
        r = self.request
        total_quality = self.policy.quality(
            r.workload_type, r.priority, pressure_ratio(total, self.total_budget)
        )
        return not self.quality_ok(total_quality)

    def useful(self, candidate: Allocation, freed: Sequence[Allocation]) -> bool:
        """Would preempting ``candidate`` help a constraint that is still violated?"""
        device = self.request.device_name
        if device is None or candidate.device == device:
            return True
        return self.total_side_violated(freed)

    def available_bytes(self) -> int:
        free = self.total_budget - self.total_allocated
        if self.request.device_name is not None:
            free = min(free, self.device_budget - self.device_allocated)
        return max(0, free)


def may_preempt(priority: Priority, holder: Allocation) -> bool:
    """The preemption rule: a request of ``priority`` may take ``holder``'s memory when the
    holder is preemptible and of a strictly lower priority."""
    return holder.preemptible and holder.priority.rank < priority.rank


def eligible_victims(
    request: AllocationRequest, allocations: Iterable[Allocation]
) -> list[Allocation]:
    """Holders ``request`` may preempt, in preemption order (see :func:`victim_order`)."""
    if not request.preempt:
        return []
    return victim_order(a for a in allocations if may_preempt(request.priority, a))


def _takeable(
    allocations: Iterable[Allocation],
    priority: Priority | None,
    spare: Callable[[Allocation], bool] | None,
) -> list[Allocation]:
    if priority is None:
        return []
    return [a for a in allocations if may_preempt(priority, a) and (spare is None or not spare(a))]


def reclaimable(
    allocations: Iterable[Allocation],
    *,
    device: str | None = None,
    priority: Priority | None = None,
    spare: Callable[[Allocation], bool] | None = None,
) -> int:
    """Bytes held by the holders a request of ``priority`` may preempt (see
    :func:`may_preempt`), less the ``spare``d ones: those naming ``device``, or all of them
    when ``device`` is None. 0 without a priority."""
    return _sum_bytes(_takeable(allocations, priority, spare), device)


def headroom(
    allocations: Iterable[Allocation],
    budget: Budget,
    *,
    device: str | None = None,
    priority: Priority | None = None,
    spare: Callable[[Allocation], bool] | None = None,
    usage: Usage | None = None,
) -> int:
    """The most bytes :func:`plan_allocation` would grant a request naming ``device`` (or
    none) at ``priority`` without a minimum quality: the free budget in the tighter of the
    total and the device, plus what preempting every holder it may take would free there.

    ``priority`` None: a request that preempts nobody. ``spare``: holders the caller does not
    count on taking (they stay). A device outside the budget has no headroom.
    """
    held = list(allocations)
    used = usage if usage is not None else Usage.of(held)
    victims = _takeable(held, priority, spare)
    room = budget.grantable_total - used.total_bytes + _sum_bytes(victims)
    if device is not None:
        if device not in budget.devices:
            return 0
        own = budget.grantable(device) - used.devices.get(device, 0) + _sum_bytes(victims, device)
        room = min(room, own)
    return max(0, room)


def plan_allocation(
    request: AllocationRequest,
    allocations: Sequence[Allocation],
    budget: Budget,
    policy: QualityPolicy,
    usage: Usage | None = None,
) -> Plan:
    """Decide a request: grant (maybe after preempting), no room, or quality too low.

    ``usage`` is ``Usage.of(allocations)`` when the caller already keeps the totals (it saves
    a pass over the allocations on the common path, where the request simply fits).
    """
    device = request.device_name
    used = usage if usage is not None else Usage.of(allocations)
    scope = _Scope(
        request=request,
        policy=policy,
        total_budget=budget.grantable_total,
        total_allocated=used.total_bytes,
        device_budget=budget.grantable(device) if device is not None else 0,
        device_allocated=used.devices.get(device, 0) if device is not None else 0,
    )
    if scope.satisfied(()):
        return Grant(scope.quality(()), scope.pressure(()))
    candidates = eligible_victims(request, allocations)
    chosen: list[Allocation] = []
    for candidate in candidates:
        if scope.useful(candidate, chosen):
            chosen.append(candidate)
            if scope.satisfied(chosen):
                break
    if not scope.satisfied(chosen):
        return _failure(scope, candidates, budget)
    for victim in reversed(chosen):  # spare, least preferred first, victims not needed
        rest = [v for v in chosen if v is not victim]
        if scope.satisfied(rest):
            chosen = rest
    return Grant(scope.quality(chosen), scope.pressure(chosen), tuple(chosen))


def _failure(
    scope: _Scope, candidates: Sequence[Allocation], budget: Budget
) -> NoRoom | QualityTooLow:
    request = scope.request
    device = request.device_name
    if not scope.memory_fits(candidates):
        relevant = [c for c in candidates if device is None or c.device == device]
        external = (
            budget.external.get(device, 0) if device is not None else sum(budget.external.values())
        )
        return NoRoom(
            requested_bytes=request.memory_bytes,
            available_bytes=scope.available_bytes(),
            reclaimable_bytes=_sum_bytes(relevant),
            budget_bytes=budget.devices.get(device, 0) if device else budget.total_bytes,
            device=device,
            external_bytes=external,
        )
    return QualityTooLow(
        minimum_quality=request.min_quality if request.min_quality is not None else 0.0,
        available_quality=scope.quality(candidates),
        device=request.device_name,
    )


def fit_to_budget(allocations: Sequence[Allocation], budget: Budget) -> list[Allocation]:
    """Holders to take away when the budget shrank (a GPU vanished or reports less memory).

    Allocations on a device that is gone go first; then, per device and then in all, holders in
    preemption order (never-evict ones last) until what remains fits. Pure; the order is the
    order to notify them in.
    """
    victims = [a for a in allocations if a.device is not None and a.device not in budget.devices]
    remaining = [a for a in allocations if a not in victims]
    order = sorted(remaining, key=lambda a: (not a.preemptible, a.priority.rank, -a.seq, a.id))
    for device, device_budget in sorted(budget.devices.items()):
        excess = _sum_bytes(remaining, device) - device_budget
        for holder in order:
            if excess <= 0:
                break
            if holder.device == device and holder in remaining:
                victims.append(holder)
                remaining.remove(holder)
                excess -= holder.memory_bytes
    excess = _sum_bytes(remaining) - budget.total_bytes
    for holder in order:
        if excess <= 0:
            break
        if holder in remaining:
            victims.append(holder)
            remaining.remove(holder)
            excess -= holder.memory_bytes
    return victims


def quality_reason(allocation: Allocation, policy: QualityPolicy) -> str:
    """What ``allocation.quality_target`` means and why it has that value, in words.

    The arbiter always grants the whole amount asked; the quality target is decided at grant
    time from the memory pressure (reserved / budget after the grant, the tighter of the whole
    budget and the named GPU): full quality up to the priority's knee, then linearly down to
    the workload type's minimum at full pressure. The pressure is recovered from the target
    (the inverse of :meth:`QualityPolicy.quality`), so nothing more is stored.
    """
    kind, priority = allocation.workload_type, allocation.priority
    minimum = policy.min_quality[kind]
    knee = policy.knee(priority)
    where = allocation.device or "the arbiter's budget"
    size = _gib(allocation.memory_bytes)
    rule = (
        f"a {priority.value}-priority {kind.value} workload runs at full quality while "
        f"{where} is at most {knee:.0%} reserved, then lower down to {minimum:.2f} at 100%"
    )
    q = allocation.quality_target
    if minimum >= 1.0 - QUALITY_EPSILON:
        return (
            f"quality 1.00 = full: {size} granted as asked; {kind.value} workloads always run "
            "at full quality (their minimum quality is 1.00), whatever the memory pressure"
        )
    if q >= 1.0 - QUALITY_EPSILON:
        return (
            f"quality 1.00 = full: {size} granted as asked, and after this grant {where} "
            f"was at most {knee:.0%} reserved ({rule})"
        )
    span = 1.0 - minimum
    pressure = knee + (1.0 - q) * (1.0 - knee) / span if span > 0 else 1.0
    return (
        f"quality {q:.2f} (1.00 = full): {size} granted as asked, but after this grant "
        f"{where} was {min(pressure, 1.0):.0%} reserved; {rule}. The workload should run "
        f"lighter to match: lower its precision, resolution or batch size"
    )


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 1024**3:.1f} GiB"

"""Profiles (execution modes: which model goes where): the profile in force, dry-run plans
(``policy.plan_profile``: VRAM is freed first, then models load) and switches that run them
step by step. On a failed step the rest is not run, the profile in force stays the previous
one, and every model's state is what its backend really holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from vramancer import event_types as ev
from vramancer.errors import BackendUnavailable, NotFound, VramancerError
from vramancer.events import EventBus
from vramancer.models import policy
from vramancer.models.errors import ProfileSwitchFailed
from vramancer.models.lifecycle import Lifecycle
from vramancer.models.locks import Locks
from vramancer.models.ports import DevicePort
from vramancer.models.registry import IDLE, empty_profile_note
from vramancer.models.room import GpuRoom
from vramancer.models.table import ModelTable
from vramancer.models.types import (
    Placement,
    PlanStep,
    ProfilePlan,
    StepAction,
    StepResult,
    StepStatus,
    SwitchReport,
)
from vramancer.observability import tracing


class Profiles:
    def __init__(
        self,
        table: ModelTable,
        profiles: Mapping[str, Mapping[str, Placement]],
        *,
        devices: DevicePort,
        room: GpuRoom,
        locks: Locks,
        lifecycle: Lifecycle,
        events: EventBus,
    ) -> None:
        self.table = table
        self.profiles = profiles
        self.devices = devices
        self.room = room
        self.locks = locks
        self.lifecycle = lifecycle
        self.events = events
        self.current = IDLE
        self.last_switch: SwitchReport | None = None
        self._switch_lock = asyncio.Lock()
        for name in profiles:
            table.metrics.mode.labels(mode=name).set(1 if name == self.current else 0)

    def placement(self, model: str) -> Placement | None:
        """What the profile in force says about ``model`` (None: nothing)."""
        return self.profiles.get(self.current, {}).get(model)

    def as_strings(self) -> dict[str, dict[str, str]]:
        return {
            name: {model: str(p) for model, p in mapping.items()}
            for name, mapping in self.profiles.items()
        }

    def plan(self, name: str) -> ProfilePlan:
        """The steps a switch to ``name`` would take now (a dry run)."""
        placements = self.profiles.get(name)
        if placements is None:
            raise NotFound(
                f"no profile {name!r} (profiles: {', '.join(sorted(self.profiles))})",
                profile=name,
            )
        views = self.table.views()
        gpus = self.devices.snapshot().gpus
        free = {g.index: self.room.room(g.index) for g in gpus}
        plan = policy.plan_profile(name, placements, views, free)
        if not placements:
            return replace(plan, notes=(*plan.notes, empty_profile_note(name)))
        return plan

    async def switch(
        self,
        name: str,
        progress: Callable[[StepResult], None] | None = None,
        *,
        strict: bool = False,
    ) -> SwitchReport:
        """Reconcile to profile ``name`` (see the module docstring). ``progress`` is called
        after each step. ``strict``: a failed step raises ``ProfileSwitchFailed``."""
        report = await self._switch(name, progress)
        if strict and not report.ok:
            raise _switch_failed(report)
        return report

    async def _switch(
        self, name: str, progress: Callable[[StepResult], None] | None
    ) -> SwitchReport:
        async with self._switch_lock:
            plan = self.plan(name)
            previous = self.current
            started = time.perf_counter()
            results: list[StepResult] = []
            failed: int | None = None
            with tracing.span("models.switch_profile", profile=name):
                for i, step in enumerate(plan.steps):
                    result = await self._run_step(step)
                    results.append(result)
                    if progress is not None:
                        progress(result)
                    if result.status is StepStatus.FAILED:
                        failed = i
                        break
            results += [StepResult(s, StepStatus.PENDING) for s in plan.steps[len(results) :]]
            report = SwitchReport(
                profile=name,
                previous=previous,
                ok=failed is None,
                steps=tuple(results),
                duration_s=time.perf_counter() - started,
                failed_step=failed,
                notes=plan.notes,
            )
            self.last_switch = report
            if failed is None:
                self._set(name, report)
            else:
                self.events.publish(
                    ev.ProfileSwitchFailed(
                        profile=name,
                        previous=previous,
                        failed_step=failed,
                        step=plan.steps[failed].describe(),
                        error=results[failed].error,
                    )
                )
            return report

    def _set(self, name: str, report: SwitchReport) -> None:
        previous, self.current = self.current, name
        for mode in self.profiles:
            self.table.metrics.mode.labels(mode=mode).set(1 if mode == name else 0)
        self.events.publish(
            ev.ModeChanged(
                previous=previous,
                mode=name,
                duration_s=round(report.duration_s, 6),
                steps=[s.step.describe() for s in report.steps],
            )
        )

    async def _run_step(self, step: PlanStep) -> StepResult:
        entry = self.table.entries[step.model]
        started = time.perf_counter()
        try:
            async with self.locks.quiesce(entry):
                if step.action is StepAction.UNLOAD:
                    async with self.locks.locked(entry):
                        await self.lifecycle.unload_locked(entry, "profile")
                else:
                    assert step.device is not None
                    async with self.locks.locked(entry, step.device):
                        await self.lifecycle.place_locked(entry, step.device, "profile")
        except VramancerError as exc:
            elapsed = time.perf_counter() - started
            return StepResult(step, StepStatus.FAILED, elapsed, exc.message, exc.code)
        return StepResult(step, StepStatus.DONE, time.perf_counter() - started)


def _switch_failed(report: SwitchReport) -> ProfileSwitchFailed:
    """The 409 of a failed switch (503 when the failed step met a backend that is down)."""
    step = report.steps[report.failed_step or 0]
    error = ProfileSwitchFailed(
        f"switch to profile {report.profile!r} stopped at step {report.failed_step} "
        f"({step.step.describe()}): {step.error}",
        profile=report.profile,
        previous=report.previous,
        failed_step=report.failed_step,
        steps=[s.as_dict() for s in report.steps],
    )
    if step.error_code == BackendUnavailable.code:
        error.http_status = BackendUnavailable.http_status  # a backend is down: 503
    return error

"""The daemon's log of what happens: one line per event of the bus that people act on.

:class:`EventLog` subscribes to the event bus in one place (the runtime) and logs, under the
``vramancer.events`` logger, tasks submitted, started and ended (with their device and how long
they ran), allocations granted and released, preemptions, models loaded, unloaded, moved and
failing, profile switches, host-memory budget changes and lost blocks. Block moves and VRAM
readings are logged at DEBUG only: they come by the hundred.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vramancer import event_types as ev
from vramancer.events import Event, EventBus
from vramancer.units import format_size

log = logging.getLogger("vramancer.events")

#: Start times kept for tasks still running (the oldest are dropped past this).
MAX_TRACKED_TASKS = 10_000
#: A task's states that end it.
_ENDED = frozenset({"done", "failed", "cancelled"})

Line = tuple[int, str]


def format_duration(seconds: float) -> str:
    """``0.4 s``, ``12.3 s``, ``2 min 5 s``, ``1 h 3 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _on(device: str | None) -> str:
    return f" on {device}" if device else ""


def _vram(n_bytes: int, what: str) -> str:
    return f"{format_size(n_bytes)} {what}" if n_bytes else ""


class EventLog:
    """Logs the bus's events (see the module's docstring). ``close()`` unsubscribes."""

    def __init__(self, bus: EventBus, logger: logging.Logger = log) -> None:
        self.log = logger
        self._started: dict[str, float] = {}
        self._formats: dict[str, Callable[[Any, float], Line | None]] = {
            "runtime_started": lambda e, _t: (logging.INFO, f"runtime started (node {e.node})"),
            "task_state": self._task,
            "allocation_granted": lambda e, _t: (
                logging.INFO,
                f"allocation {e.id} granted: {format_size(e.memory_bytes)}{_on(e.device)} for "
                f"{e.workload_type} (priority {e.priority}, owner {e.owner or '-'})",
            ),
            "allocation_released": lambda e, _t: (
                logging.INFO,
                f"allocation {e.id} released: {format_size(e.memory_bytes)}{_on(e.device)}",
            ),
            "preempted": lambda e, _t: (
                logging.WARNING,
                f"allocation {e.allocation_id} ({format_size(e.memory_bytes)}{_on(e.device)}) "
                f"preempted by {e.by or '-'}: {e.reason}",
            ),
            "model_loaded": lambda e, _t: (
                logging.INFO,
                f"model {e.model} loaded on {e.runs_on} in {format_duration(e.duration_s)} "
                f"({_vram(e.vram_bytes, 'of VRAM; ')}{e.reason})",
            ),
            "model_unloaded": lambda e, _t: (
                logging.INFO,
                f"model {e.model} unloaded{_on(e.device)} "
                f"({_vram(e.freed_bytes, 'freed; ')}{e.reason})",
            ),
            "model_migrated": lambda e, _t: (
                logging.INFO,
                f"model {e.model} moved from {e.from_ or '-'} to {e.to} in "
                f"{format_duration(e.duration_s)} ({e.reason})",
            ),
            "model_error": lambda e, _t: (
                logging.WARNING,
                f"model {e.model}: {e.operation} failed ({e.code}): {e.error}",
            ),
            "model_preempted": lambda e, _t: (
                logging.INFO,
                f"model {e.model}{_on(e.device)} yields to allocation {e.allocation_id}",
            ),
            "idle_unload": lambda e, _t: (
                logging.INFO,
                f"model {e.model} idle for {format_duration(e.idle_s)}: unloading",
            ),
            "mode_changed": lambda e, _t: (
                logging.INFO,
                f"profile switched from {e.previous or '-'} to {e.mode} in "
                f"{format_duration(e.duration_s)} ({len(e.steps)} step(s))",
            ),
            "profile_switch_failed": lambda e, _t: (
                logging.WARNING,
                f"switching to profile {e.profile} failed at step {e.failed_step} ({e.step}): "
                f"{e.error or 'unknown error'}; still on {e.previous or '-'}",
            ),
            "memory_budget_changed": lambda e, _t: (
                logging.INFO,
                f"{e.tier} budget {format_size(e.old_bytes)} -> {format_size(e.new_bytes)} "
                f"({e.action}: {e.reason}; host memory available {format_size(e.available_bytes)})",
            ),
            "block_lost": lambda e, _t: (logging.WARNING, f"block {e.id} lost: {e.reason}"),
        }
        self.close = bus.subscribe(self.handle)

    def handle(self, event: Event) -> None:
        fmt = self._formats.get(event.kind)
        if fmt is None:
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("%s %s", event.kind, event.data)
            return
        line = fmt(event.payload, event.timestamp)
        if line is not None:
            self.log.log(line[0], "%s", line[1])

    def _task(self, e: ev.TaskStateChanged, at: float) -> Line | None:
        if e.state == "running":
            self._remember(e.task_id, at)
            return logging.INFO, f"task {e.task_id} started{_on(e.device)} (attempt {e.attempts})"
        if e.state in _ENDED:
            began = self._started.pop(e.task_id, None)
            took = f" after {format_duration(max(0.0, at - began))}" if began is not None else ""
            code = f", exit code {e.exit_code}" if e.exit_code is not None else ""
            why = f": {e.error}" if e.error and e.state != "done" else ""
            level = logging.WARNING if e.state == "failed" else logging.INFO
            return level, f"task {e.task_id} {e.state}{_on(e.device)}{took}{code}{why}"
        if e.state == "queued" and e.previous is None:
            return logging.INFO, f"task {e.task_id} submitted ({e.type})"
        if e.state == "retry":
            self._started.pop(e.task_id, None)
            return logging.INFO, f"task {e.task_id} will retry: {e.error or 'attempt failed'}"
        self.log.debug("task %s %s", e.task_id, e.state)
        return None

    def _remember(self, task_id: str, at: float) -> None:
        self._started.pop(task_id, None)
        self._started[task_id] = at
        while len(self._started) > MAX_TRACKED_TASKS:
            del self._started[next(iter(self._started))]

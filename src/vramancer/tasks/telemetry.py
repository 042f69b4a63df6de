"""Events and metrics from the queue's committed ``Change``s, and the task counts they keep.

Every mutation of the queue returns the changes it committed; ``Telemetry.publish`` is the one
place they become a ``task_state`` event each, the Prometheus counters, gauges and histograms,
the counts per (lane, state) that the dispatcher and the maintenance lane read instead of
querying the queue, and the run times the estimator learns from. The counts start from the
queue's own (``reset``) and follow every change, so they stay exact without a read per round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vramancer import event_types as ev
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.tasks.model import READY_STATES, Change, TaskState, TaskType
from vramancer.tasks.picker import HOST
from vramancer.tasks.queue import Purged

#: Histogram buckets (seconds) of task wait and run times.
TIME_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_TERMINAL = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)
_DEPTH_STATES = (*READY_STATES, TaskState.RETRY)


class Telemetry:
    """Counts, metrics and events of the tasks; see the module docstring.

    ``observe(estimate_key, run_s)`` learns the run time of a task that ended done;
    ``on_end(task_id)`` hears of every task that ended (waiters)."""

    def __init__(
        self,
        metrics: Metrics,
        events: EventBus,
        *,
        observe: Callable[[str, float], object],
        on_end: Callable[[str], None],
    ) -> None:
        self.events = events
        self._observe = observe
        self._on_end = on_end
        self.counts: dict[tuple[bool, TaskState], int] = {}
        #: Count only what the shared store reports (``publish``'s ``observed``).
        self.follow_store = False
        #: Called with every batch of purged tasks (HA replication journals their deletion).
        self.purge_listeners: list[Callable[[Sequence[Purged]], None]] = []
        self._children: dict[tuple[int, str], Any] = {}
        self._m_submitted = metrics.counter(
            "vramancer_tasks_submitted_total", "Tasks accepted into the queue.", ["type"]
        )
        self._m_completed = metrics.counter(
            "vramancer_tasks_completed_total", "Tasks that ended done.", ["type"]
        )
        self._m_failed = metrics.counter(
            "vramancer_tasks_failed_total", "Tasks that ended failed after their retries.", ["type"]
        )
        self._m_running = metrics.gauge("vramancer_tasks_running", "Tasks running now.")
        self._m_purged = metrics.counter(
            "vramancer_tasks_purged_total", "Ended tasks deleted after [tasks] retention_s."
        )
        self._m_depth = metrics.gauge(
            "vramancer_tasks_queue_depth", "Tasks waiting to run (queued, waiting_gpu, retry)."
        )
        self._m_wait = metrics.histogram(
            "vramancer_tasks_wait_seconds",
            "Time from ready to running, per device.",
            ["device"],
            TIME_BUCKETS,
        )
        self._m_run = metrics.histogram(
            "vramancer_tasks_run_seconds",
            "Run time of an attempt, per device.",
            ["device"],
            TIME_BUCKETS,
        )
        # the gauges read the counts when scraped, not at every change
        self._m_running.set_function(lambda: self._count((TaskState.RUNNING,)))
        self._m_depth.set_function(lambda: self._count(_DEPTH_STATES))

    def _count(self, states: Iterable[TaskState]) -> int:
        """Tasks of both lanes in ``states`` (read when the gauges are scraped)."""
        return self.lane_count(False, states) + self.lane_count(True, states)

    def reset(self, counts: Mapping[tuple[bool, TaskState], int]) -> None:
        """Start from the queue's counts (at start-up)."""
        self.counts = dict(counts)

    def lane_count(self, maintenance: bool, states: Iterable[TaskState]) -> int:
        """Tasks of one lane (maintenance or user) in ``states``."""
        return sum(self.counts.get((maintenance, state), 0) for state in states)

    def by_state(self) -> dict[str, int]:
        """Tasks per state, both lanes."""
        out = {state.value: 0 for state in TaskState}
        for (_, state), n in self.counts.items():
            out[state.value] += n
        return out

    def publish(self, changes: Sequence[Change], *, observed: bool = False) -> None:
        """Count, measure, announce: one ``task_state`` event per committed change.

        With ``follow_store`` set (an orchestrator of a pool, whose queue is shared), only the
        changes the shared store itself reports (``observed``) count: a change written here
        is reported by the store too, and each must count once."""
        if not changes or (self.follow_store and not observed):
            return
        for change in changes:
            self._account(change)
            kind = change.type or TaskType.CMD
            self.events.publish(
                ev.TaskStateChanged(
                    task_id=change.task_id,
                    state=change.state.value,
                    previous=change.previous.value if change.previous else None,
                    attempts=change.attempts,
                    device=change.device,
                    exit_code=change.exit_code,
                    error=change.error,
                    type=kind.value,
                )
            )
            if change.state in _TERMINAL:
                self._on_end(change.task_id)

    def purged(self, tasks: Sequence[Purged], *, observed: bool = False) -> None:
        """Tasks the retention purge deleted leave the counts (``purge_listeners`` hear of
        every purge reported here)."""
        for listener in self.purge_listeners:
            listener(tasks)
        if self.follow_store and not observed:
            return
        for task in tasks:
            key = (task.maintenance, task.state)
            self.counts[key] = self.counts.get(key, 0) - 1
        self._m_purged.inc(len(tasks))

    def _account(self, change: Change) -> None:
        counts = self.counts
        kind = change.type or TaskType.CMD
        lane = kind.maintenance
        if change.previous is not None:
            counts[(lane, change.previous)] = counts.get((lane, change.previous), 0) - 1
        else:
            self._child(self._m_submitted, "type", kind.value).inc()
        counts[(lane, change.state)] = counts.get((lane, change.state), 0) + 1
        device = change.device or HOST
        if change.wait_s is not None:
            self._child(self._m_wait, "device", device).observe(change.wait_s)
        if change.run_s is not None:
            self._child(self._m_run, "device", device).observe(change.run_s)
        if change.state is TaskState.DONE:
            self._child(self._m_completed, "type", kind.value).inc()
            if change.estimate_key and change.run_s is not None:
                self._observe(change.estimate_key, change.run_s)
        elif change.state is TaskState.FAILED:
            self._child(self._m_failed, "type", kind.value).inc()

    def _child(self, metric: Any, label: str, value: str) -> Any:
        """The labelled child of ``metric``, cached (``labels()`` is slow on the hot path)."""
        key = (id(metric), value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**{label: value})
        return child

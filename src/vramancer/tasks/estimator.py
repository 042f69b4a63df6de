"""Expected run time of a task: the ``RuntimeEstimator`` Protocol and its default.

The dispatcher orders tasks of one priority by expected duration, shortest first. The default
estimator learns per command (``TaskSpec.estimate_key``: the program and its first argument, the
shell words, or the python target) an exponential moving average of the run times of tasks that
ended done; a command never seen gets ``default_s``. The queue persists what it learned, so a
restart keeps it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol, cast, runtime_checkable

from vramancer.tasks.model import TaskSpec

__all__ = ["HistoryEstimator", "RuntimeEstimator", "as_runtime_estimator"]


@runtime_checkable
class RuntimeEstimator(Protocol):
    """Seconds a task is expected to run, learned from the run times of tasks that ended done.

    The dispatcher orders tasks of one priority by ``estimate`` (shortest first); the service
    calls ``observe`` once per task that ends done, with its ``TaskSpec.estimate_key`` and its
    run time. An estimator that learns nothing makes ``observe`` do nothing.
    """

    def estimate(self, task: TaskSpec) -> float: ...

    def observe(self, key: str, run_s: float) -> float | None: ...


class HistoryEstimator:
    """Moving average of past run times per command; ``default_s`` for unknown commands."""

    def __init__(
        self,
        default_s: float = 60.0,
        alpha: float = 0.3,
        learned: Mapping[str, float] | None = None,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (got {alpha})")
        self.default_s = default_s
        self.alpha = alpha
        self._mean: dict[str, float] = dict(learned or {})
        self._lock = threading.Lock()

    def estimate(self, task: TaskSpec) -> float:
        """Learned mean run time of the task's command, or ``default_s``."""
        return self.estimate_key(task.estimate_key())

    def estimate_key(self, key: str) -> float:
        return self._mean.get(key, self.default_s)

    def observe(self, key: str, run_s: float) -> float:
        """Fold one run time into the average for ``key``; returns the new average."""
        with self._lock:
            old = self._mean.get(key)
            new = run_s if old is None else old + self.alpha * (run_s - old)
            self._mean[key] = new
        return new


class _LearnsNothing:
    """An estimator that only estimates (the documented method): it is told no run times."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def estimate(self, task: TaskSpec) -> float:
        return float(self.inner.estimate(task))

    def observe(self, key: str, run_s: float) -> None:
        return None


def as_runtime_estimator(obj: Any) -> RuntimeEstimator:
    """``obj`` as a :class:`RuntimeEstimator`: as it is when it also learns (``observe``),
    else wrapped so that only ``estimate`` is required of an extension."""
    if callable(getattr(obj, "observe", None)):
        return cast(RuntimeEstimator, obj)
    return _LearnsNothing(obj)

"""Runtime estimators loaded by dotted path in the estimator tests (``[tasks]
runtime_estimator``)."""

from __future__ import annotations

from vramancer.tasks.model import TaskSpec


class ByLastArgument:
    """Only the documented method: a ``cmd`` task is expected to run as many seconds as its
    last argument says (``["sleep", "3"]``: 3 s)."""

    def estimate(self, task: TaskSpec) -> float:
        return float(task.cmd[-1]) if task.cmd and len(task.cmd) > 1 else 100.0

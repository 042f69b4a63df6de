"""RQ side of the comparison: the no-op job function and its ``on_success`` counter."""

from __future__ import annotations

from typing import Any

import redis

from bench.tasks.compare_common import DONE_KEY


def noop() -> None:
    """Does nothing: the benchmark measures the queue, not the work."""
    return None


def count_done(job: Any, connection: redis.Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    """RQ ``on_success`` callback: one ``INCR`` per finished job."""
    connection.incr(DONE_KEY)

"""Shared constants of the task-queue comparison: where workers find Redis, the counter they bump.

Every competitor's worker counts finished tasks with one Redis ``INCR`` from its framework's own
"task finished" hook (Celery ``task_postrun``, RQ ``on_success``, huey ``SIGNAL_COMPLETE``,
Dramatiq ``after_process_message``), so the driver can tell "all done" the same way for all four
without storing or polling 10,000 results.
"""

from __future__ import annotations

import os

#: Environment variable naming the Redis URL the worker apps and the driver use.
REDIS_URL_ENV = "BENCH_TASKS_REDIS_URL"
#: Redis key incremented once per finished task.
DONE_KEY = "bench:tasks:done"
#: Queue / task names, the same for every framework.
QUEUE_NAME = "bench_noop"


def redis_url() -> str:
    """The Redis URL the benchmark driver exported for its workers."""
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        raise RuntimeError(f"{REDIS_URL_ENV} is not set; run the workers via bench.tasks.compare")
    return url
